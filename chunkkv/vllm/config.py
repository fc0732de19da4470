"""The ``chunkkv`` entry of vLLM's ``additional_config``: parsed and checked once, at engine start."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .. import compressors as _methods

#: key of vLLM's additional_config that turns the integration on
CONFIG_KEY = "chunkkv"

#: methods that keep one set of positions for all heads of a layer, with an exact budget
SHARED_METHODS = ("chunkkv", "streamingllm", "random")

_KEYS = ("budget", "keep_ratio", "window", "chunk_size", "reuse", "method", "per_head", "n_sink", "seed", "free_tail")


class ChunkKVConfigError(ValueError):
    """A bad ``additional_config["chunkkv"]`` (raised at engine start)."""


def _fail(key: str, message: str) -> ChunkKVConfigError:
    return ChunkKVConfigError(f"chunkkv: additional_config['chunkkv']['{key}']: {message}")


def _int(options: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(key, f"expected an int, got {value!r}")
    if value < minimum:
        raise _fail(key, f"expected an int >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ChunkKVConfig:
    """What the vLLM integration does; the fields mean what they mean in ``chunkkv.patch``."""

    budget: Optional[int] = None
    keep_ratio: Optional[float] = None
    window: int = 32
    chunk_size: int = 10
    reuse: int = 1
    method: str = "chunkkv"
    n_sink: int = 4
    seed: int = 0
    free_tail: bool = True  # False keeps a compressed request's tail blocks (to test that freeing is exact)

    def kept_tokens(self, prompt_len: int) -> Optional[int]:
        """Tokens kept per layer after a prefill of ``prompt_len`` tokens, or None when nothing is dropped.

        The same rule as ``chunkkv.patch``: ``budget``, or ``ceil(keep_ratio * L)`` but never below the
        window; a prompt no longer than that is kept whole.
        """
        kept = _methods.kept_budget(self.budget, self.keep_ratio, self.window, prompt_len)
        return kept if prompt_len > kept else None

    def window_for(self, prompt_len: int, kept: int) -> int:
        """How many of the last prompt queries score (as ``chunkkv.patch``: min(window, L, budget))."""
        return min(self.window, prompt_len, kept)

    def patch_kwargs(self) -> dict[str, Any]:
        """The same settings as ``chunkkv.patch`` keyword arguments (the transformers oracle)."""
        kw: dict[str, Any] = {"window": self.window, "chunk_size": self.chunk_size, "reuse": self.reuse,
                              "method": self.method}
        kw["budget" if self.budget is not None else "keep_ratio"] = (
            self.budget if self.budget is not None else self.keep_ratio)
        if self.method == "streamingllm":
            kw["n_sink"] = self.n_sink
        if self.method == "random":
            kw["seed"] = self.seed
        return kw


def parse(additional_config: Optional[Mapping[str, Any]]) -> Optional[ChunkKVConfig]:
    """The checked config, or None when ``additional_config`` has no ``chunkkv`` key.

    Raises:
        ChunkKVConfigError: naming chunkkv and the key, for an unknown key, both or neither of
            budget/keep_ratio, a per-head or unknown method, or a value out of range.
    """
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    options = additional_config[CONFIG_KEY]
    if not isinstance(options, Mapping):
        raise ChunkKVConfigError(f"chunkkv: additional_config['chunkkv'] must be a dict, got {options!r}")
    unknown = sorted(set(options) - set(_KEYS))
    if unknown:
        raise _fail(unknown[0], f"unknown key; expected some of {list(_KEYS)}")
    method = options.get("method", "chunkkv")
    if method not in _methods.METHODS:
        raise _fail("method", f"expected one of {list(SHARED_METHODS)}, got {method!r}")
    spec = _methods.get(method)
    if method not in SHARED_METHODS:
        why = ("selects separately for each KV head (or gives layers their own budgets)" if spec.per_head
               else "keeps a data-dependent number of tokens")
        raise _fail("method", f"{method!r} {why}, which vLLM's paged cache cannot free per head; "
                              f"use one of {list(SHARED_METHODS)}")
    if options.get("per_head", False) is not False:
        raise _fail("per_head", "per-head selection is not supported in vLLM (one block table per request "
                                "holds the same positions for every head); use False")
    has_budget, has_ratio = options.get("budget") is not None, options.get("keep_ratio") is not None
    if has_budget == has_ratio:
        key = "budget" if has_budget else "keep_ratio"
        raise _fail(key, "give exactly one of budget (tokens) or keep_ratio (fraction)")
    window = _int(options, "window", spec.window, 1)
    chunk_size = _int(options, "chunk_size", spec.chunk_size, 1)
    reuse = _int(options, "reuse", 1, 1)
    n_sink = _int(options, "n_sink", 4, 0)
    seed = _int(options, "seed", 0, 0)
    free_tail = options.get("free_tail", True)
    if not isinstance(free_tail, bool):
        raise _fail("free_tail", f"expected a bool, got {free_tail!r}")
    budget = keep_ratio = None
    if has_budget:
        budget = _int(options, "budget", 0, 1)
        if budget < window:
            raise _fail("budget", f"expected >= window ({window}), got {budget}: the window is always kept")
    else:
        keep_ratio = options["keep_ratio"]
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
            raise _fail("keep_ratio", f"expected a fraction in (0, 1], got {keep_ratio!r}")
        keep_ratio = float(keep_ratio)
    return ChunkKVConfig(budget=budget, keep_ratio=keep_ratio, window=window, chunk_size=chunk_size, reuse=reuse,
                         method=method, n_sink=n_sink, seed=seed, free_tail=free_tail)
