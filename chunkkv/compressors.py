"""The compression methods `chunkkv.patch` runs, one small entry each (chunkkv.methods() lists them).

Every method selects in the C core (`chunkkv.select`, one core method per entry); what differs
is which queries score, the defaults, and (PyramidKV) how the budget is spread over layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Method:
    """A compression method as `chunkkv.patch` runs it."""

    name: str
    core: str                      # the chunkkv.select method that picks the positions
    description: str
    window: int = 32               # observation window (recent tokens kept, for h2o)
    chunk_size: int = 10
    per_head: bool = False         # default selection granularity
    all_queries: bool = False      # score with every prompt query (h2o), not just the window
    pyramid: bool = False          # per-layer budgets shrinking with depth (PyramidKV)
    select_args: dict = field(default_factory=dict)
    budget_exact: bool = True      # every layer keeps exactly its budget


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("chunkkv", "chunkkv", "ChunkKV (the paper): whole chunks ranked by window attention; exact budget."),
    Method("chunkkv-kvpress", "chunkkv-kvpress",
           "kvpress's ChunkKVPress(SnapKVPress(), chunk_length=20): chunk means over all tokens, whole chunks "
           "only, so it may keep fewer tokens than asked.",
           window=64, chunk_size=20, select_args={"pool_kernel": 5}, budget_exact=False),
    Method("snapkv", "snapkv", "SnapKV: per-KV-head top tokens of average-pooled window attention, plus the window.",
           per_head=True, select_args={"pool_kernel": 5, "pool": "avg"}),
    Method("pyramidkv", "snapkv", "PyramidKV: SnapKV scoring with per-layer budgets shrinking linearly with depth "
           "(same total).", per_head=True, pyramid=True, select_args={"pool_kernel": 5, "pool": "avg"}),
    Method("h2o", "h2o", "H2O: heavy hitters by the attention every prompt query pays each key, plus recent tokens.",
           per_head=True, all_queries=True),
    Method("streamingllm", "streamingllm", "StreamingLLM: the first n_sink tokens and the most recent ones.",
           select_args={"n_sink": 4}),
    Method("random", "random", "Random prefix tokens plus the window: a floor for comparisons."),
]}


def methods() -> dict[str, str]:
    """Every method `chunkkv.patch(method=...)` accepts, with one line each."""
    return {name: m.description for name, m in METHODS.items()}


def get(name: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {name!r}")
    return METHODS[name]


def pyramid_budgets(budget: int, window: int, prefix: int, layers: int, beta: float = 20.0) -> list[int]:
    """PyramidKV's schedule: per-layer budgets (window included) falling linearly with depth.

    The prefix tokens kept per layer average a = budget - window over the layers; the deepest layer
    keeps a / beta of them, the first 2a - a / beta (capped at the prefix length, the rest moved to
    the deepest layer), so the total matches `layers * budget` up to rounding.
    """
    avg = max(budget - window, 0)
    if layers == 1 or avg == 0:
        return [budget] * layers
    low = avg / beta
    high = 2 * avg - low
    if high > prefix:
        high = prefix
        low = 2 * avg - high
    step = (high - low) / (layers - 1)
    return [window + int(round(high - i * step)) for i in range(layers)]


def layer_budget(method: Method, budget: int, window: int, prefix: int, rank: int, layers: int,
                 beta: Optional[float] = None) -> int:
    """Budget of the full-attention layer of the given rank."""
    if not method.pyramid:
        return budget
    return pyramid_budgets(budget, window, prefix, layers, beta or 20.0)[rank]
