#!/usr/bin/env python3
"""How close a compressed cache stays to the full one, layer by layer (after the ChunkKV paper's
quantitative analysis, arXiv 2502.00299, appendix A: KV cache L1 loss, attention cosine similarity,
and the Jaccard similarity of kept indices between adjacent layers, its Table 2).

For each prompt the full-cache model decodes --new-tokens tokens greedily (the reference). Each method
then prefills the same prompt under chunkkv.patch and is fed the *same* tokens (teacher forcing), so
every decoding step compares like with like. Definitions, per full-attention layer l:

* **KV cache L1 loss** -- the compressed prompt cache put back at its positions, zeros where tokens
  were evicted (K^_l, V^_l of shape [Hkv, L, D]), against the full prompt cache:
  ``L1_l = 1/2 * ( mean|K_l - K^_l| + mean|V_l - V^_l| )``, means over every head, position and channel.
  Kept entries are exact copies at prefill, so this is the absolute mass of what was evicted; lower is
  better; 0 when nothing is dropped.
* **attention-output cosine** -- at each decoded token, the cosine similarity of the attention module's
  output (after o_proj, the vector added to the residual stream) with and without compression,
  averaged over the decoded tokens; higher is better, 1 = identical.
* **attention-weight cosine** -- at each decoded token, the cosine similarity of the attention
  distribution over all positions seen (compressed: zero at evicted positions), per query head,
  averaged over heads and decoded tokens (the paper's "attention cosine similarity" of scores).
* **Jaccard of kept positions** -- ``|P_l & P_l+1| / |P_l | P_l+1|`` of the prompt positions kept by layers
  l and l+1 (CompressedLayer.positions() right after prefill; per KV head, averaged, for per-head
  methods); the window is kept everywhere and counts in both sets. reuse=N makes it 1 inside a group.
* **token agreement** -- the fraction of decoding steps at which the compressed model's greedy next
  token equals the reference's.

Writes the JSON (per-layer lists and means; resumable), a figure per budget under plots/, and a table.

    chunkkv-eval fidelity --length 2048 --limit 4 --budgets 0.1,0.2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import harness as C
from . import metrics as M
import chunkkv
from chunkkv.cache import layer_positions
from chunkkv.patching import window_queries

SCRIPT = "fidelity"
INSTRUCTION = "Read the following text and summarize it.\n\n"


def prompt_texts(source: str, n: int) -> list[str]:
    if source == "multi_news":
        path = C.default_shared("data", "longbench", "multi_news.jsonl")
        if path is None:
            raise SystemExit("--source multi_news: <shared>/data/longbench/multi_news.jsonl not found "
                             "(set CHUNKKV_SHARED)")
        with path.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for _, line in zip(range(n), fh)]
        return [r["context"].replace("NEWLINE_CHAR", "\n") for r in rows]
    if source == "essays":
        folder = C.default_shared("data", "niah", "PaulGrahamEssays")
        if folder is None:
            raise SystemExit("--source essays: <shared>/data/niah/PaulGrahamEssays not found (set CHUNKKV_SHARED)")
        files = sorted(folder.glob("*.txt"))
        return [f.read_text(encoding="utf-8", errors="replace") for f in files[:n]]
    if source == "filler":
        return [C.NOISE * 400] * n
    p = Path(source)
    if p.is_file():
        return [p.read_text(encoding="utf-8", errors="replace")] * n
    raise SystemExit(f"--source {source!r}: expected multi_news, essays, filler or a text file")


class Capture:
    """Forward hooks on every attention module recording, at decoding steps (one new token), the
    module's output and the attention distribution over all positions seen (scattered by position)."""

    def __init__(self, engine: C.Engine):
        self.modules = engine._attention_modules()
        self.outs: dict[int, list[torch.Tensor]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.hooks = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in self.modules.items()]

    def reset(self) -> None:
        self.outs, self.weights = {}, {}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def _hook(self, li: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if hidden is None or hidden.shape[1] != 1 or cache is None:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.outs.setdefault(li, []).append(out[0, -1].detach().float().clone())
            layer = cache.layers[li]
            q = window_queries(module, hidden, kwargs, 1)[0, :, 0].float()          # [Hq, D]
            keys = layer.keys[0].float()                                             # [Hkv, n, D]
            group = q.shape[0] // keys.shape[0]
            k = keys.repeat_interleave(group, dim=0)                                 # [Hq, n, D]
            scale = float(getattr(module, "scaling", q.shape[-1] ** -0.5))
            p = torch.softmax(torch.einsum("hd,hnd->hn", q, k) * scale, dim=-1)      # [Hq, n]
            pos = layer_positions(layer)[0]                                          # [n] or [Hkv, n]
            if pos.ndim == 2:
                pos = pos.repeat_interleave(group, dim=0)
            else:
                pos = pos.expand(p.shape[0], -1)
            full = torch.zeros(p.shape[0], layer.get_seq_length(), dtype=torch.float32)
            full.scatter_(1, pos.long(), p)
            self.weights.setdefault(li, []).append(full)
        return hook


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def scatter_prompt(t: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
    """Stored entries [Hkv, n, D] at their positions ([n] or [Hkv, n]) in a zero [Hkv, length, D] tensor."""
    out = torch.zeros(t.shape[0], length, t.shape[2], dtype=torch.float32)
    if positions.ndim == 1:
        positions = positions.expand(t.shape[0], -1)
    out.scatter_(1, positions.long()[..., None].expand(-1, -1, t.shape[2]), t.float())
    return out


def kept_sets(positions: torch.Tensor, length: int) -> list[set]:
    """Kept prompt positions, one set per KV head (a single set for a shared selection)."""
    if positions.ndim == 1:
        return [set(int(x) for x in positions if x < length)]
    return [set(int(x) for x in row if x < length) for row in positions]


def teacher_forced(engine: C.Engine, capture: Capture, job: C.Job, teacher: list[int]):
    """Prefill job, feed the teacher tokens one by one; returns (prompt cache per layer, kept positions
    per layer, captured outputs and weights, greedy-agreement count)."""
    model = engine.model
    cache, logits = engine.prefill(job)
    prompt_kv = [(layer.keys[0].float().clone(), layer.values[0].float().clone()) for layer in cache.layers]
    positions = [layer_positions(layer)[0].clone() for layer in cache.layers]
    capture.reset()
    agree = int(int(logits.argmax()) == teacher[0])
    with C.patch_context(model, job.spec, job.budget):
        for i, tok in enumerate(teacher[:-1]):
            out = model(input_ids=torch.tensor([[tok]]), **{chunkkv.cache_kwarg(model): cache}, use_cache=True)
            agree += int(int(out.logits[0, -1].argmax()) == teacher[i + 1])
    return prompt_kv, positions, capture.outs, capture.weights, agree


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunkkv-eval fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=None, help="multi_news (default when $CHUNKKV_SHARED, or ../shared beside a "
                                                  "source checkout, has it), essays, filler (the default "
                                                  "otherwise) or a text file")
    p.add_argument("--length", type=int, default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--new-tokens", type=int, default=16, help="decoded (teacher-forced) tokens compared")
    C.add_common_args(p, budgets="0.1,0.2", out=str(C.RESULTS_DIR / "fidelity.json"), limit=4,
                      methods="chunkkv,chunkkv:reuse=2,snapkv,streamingllm")
    args = p.parse_args(argv)
    if args.source is None:
        args.source = "multi_news" if C.default_shared("data", "longbench", "multi_news.jsonl") else \
            "essays" if C.default_shared("data", "niah", "PaulGrahamEssays") else "filler"
    return args


def figures(results: dict, folder: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_budget: dict[str, dict[str, list[dict]]] = {}
    for e in results.values():
        by_budget.setdefault(e["budget"], {}).setdefault(e["method"], []).append(e)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for budget, methods in sorted(by_budget.items()):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for method in C.method_order(methods):
            entries = methods[method]
            for ax, field in zip(axes, ("kv_l1_layers", "attn_out_cos_layers", "jaccard_layers")):
                series = [e[field] for e in entries]
                n = min(len(s) for s in series)
                avg = [sum(s[i] for s in series) / len(series) for i in range(n)]
                ax.plot(range(n), avg, marker=".", label=method)
        axes[0].set_title("KV cache L1 loss (lower is closer)")
        axes[1].set_title("attention-output cosine (higher is closer)")
        axes[2].set_title("Jaccard of kept positions, layer l vs l+1")
        for ax in axes:
            ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=7)
        fig.suptitle(f"fidelity to the full cache @ budget {budget}")
        fig.tight_layout()
        path = folder / f"fidelity_{C.safe_name(budget)}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def summarize(results: dict) -> list[tuple[str, list[str], list[list]]]:
    fields = [("kv_l1", "KV L1 loss"), ("attn_out_cos", "attn-output cos"), ("attn_weight_cos", "attn-weight cos"),
              ("jaccard", "adjacent-layer Jaccard"), ("token_agree", "token agreement")]
    rows = []
    for m in C.method_order(e["method"] for e in results.values()):
        for b in C.budget_order(e["budget"] for e in results.values()):
            es = [e for e in results.values() if e["method"] == m and e["budget"] == b]
            if es:
                rows.append([m, b] + [C.mean(e[f] for e in es) for f, _ in fields])
    return [("means over layers and prompts", ["method", "budget"] + [t for _, t in fields], rows)]


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = [s for s in C.parse_methods(args.methods) if not s.is_full]
    budgets = C.parse_budgets(args.budgets)
    config = C.common_config(args) | {"source": args.source, "length": args.length, "new_tokens": args.new_tokens}
    store = C.ResultStore(args.out, SCRIPT, config, strict=("model", "source", "length", "new_tokens"))
    plan = [(C.make_key(i, spec.label, b.label), i, spec, b) for i in range(args.limit) for spec in specs
            for b in budgets]
    todo = set(store.pending(k for k, *_ in plan))
    print(f"fidelity: {len(plan)} runs, {store.skipped} already in {args.out}, {len(todo)} to run", flush=True)
    if todo:
        C.setup(args)
        model, tok = C.load(args.model, args.attn)
        chat = not args.no_chat_template
        engine = C.engine_from_args(model, tok, args)
        texts = prompt_texts(args.source, args.limit)
        capture = Capture(engine)
        bar = C.tqdm(total=len(todo), desc="fidelity", disable=args.quiet)
        try:
            for i, text in enumerate(texts):
                runs = [(k, spec, b) for k, j, spec, b in plan if j == i and k in todo]
                if not runs:
                    continue
                hay = C.Haystack(tok, text)
                ids = C.fit_prompt(hay, lambda ctx: C.encode_prompt(tok, INSTRUCTION + ctx, chat=chat),
                                   args.length, [])
                full = C.Job("full", ids, C.parse_method("full"), None, args.new_tokens)
                # the reference: greedy tokens of the full cache
                ref_out = engine.run([full], desc="reference")["full"]
                teacher = ([ref_out.tokens[0]] if ref_out.tokens else [tok.eos_token_id]) + ref_out.tokens[1:]
                while len(teacher) < args.new_tokens:   # stopped early: keep feeding the end token
                    teacher.append(tok.eos_token_id)
                full_kv, _, full_outs, full_w, _ = teacher_forced(engine, capture, full, teacher)
                full_outs = {k: list(v) for k, v in full_outs.items()}
                full_w = {k: list(v) for k, v in full_w.items()}
                L = len(ids)
                for key, spec, b in runs:
                    job = C.Job(key, ids, spec, b, args.new_tokens)
                    kv, positions, outs, weights, agree = teacher_forced(engine, capture, job, teacher)
                    l1, oc, wc, jac = [], [], [], []
                    layers = sorted(full_outs)
                    for li in range(len(kv)):
                        k_hat = scatter_prompt(kv[li][0], positions[li], L)
                        v_hat = scatter_prompt(kv[li][1], positions[li], L)
                        l1.append(0.5 * float((full_kv[li][0] - k_hat).abs().mean() +
                                              (full_kv[li][1] - v_hat).abs().mean()))
                    for li in layers:
                        oc.append(float(torch.stack([cosine(a, c) for a, c in zip(full_outs[li], outs[li])]).mean()))
                        wc.append(float(torch.stack([cosine(a, c).mean() for a, c in zip(full_w[li], weights[li])]).mean()))
                    sets = [kept_sets(p, L) for p in positions]
                    for li in range(len(sets) - 1):
                        a, c = sets[li], sets[li + 1]
                        if len(a) != len(c):  # shared vs per-head: compare each head with the shared set
                            a = a * len(c) if len(a) == 1 else a
                            c = c * len(a) if len(c) == 1 else c
                        jac.append(sum(M.jaccard(x, y) for x, y in zip(a, c)) / len(a))
                    store.put(key, {"method": spec.label, "budget": b.label, "prompt": i, "prompt_tokens": L,
                                    "kv_tokens": C.mean(p.shape[-1] for p in positions),
                                    "kv_l1": C.mean(l1), "attn_out_cos": C.mean(oc), "attn_weight_cos": C.mean(wc),
                                    "jaccard": C.mean(jac), "token_agree": agree / len(teacher),
                                    "kv_l1_layers": l1, "attn_out_cos_layers": oc, "attn_weight_cos_layers": wc,
                                    "jaccard_layers": jac})
                    bar.update(1)
                store.save()
        finally:
            capture.remove()
        bar.close()
    store.save()
    paths = figures(store.results, C.plots_dir(args.out)) if store.results else []
    for title, headers, rows in summarize(store.results):
        print(f"\nfidelity ({args.model}, {args.source}, {args.length} tokens), {title}:")
        print(C.format_table(headers, rows, floatfmt="{:.4f}"))
    print(f"\n{len(paths)} figures in {C.plots_dir(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
