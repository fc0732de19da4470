"""The registry of compression methods: the one place a method is defined.

A method declares its name, description, defaults, the options it takes and how it behaves:
which queries score (the observation window, or every prompt query), how its budget is spread
over layers, whether its layers can share one selection (layer-wise reuse), whether it keeps an
exact budget. `chunkkv.patch` (and any other integration) only asks the registry; it never names
a method.

Methods that select in the C core set ``core`` (a `chunkkv.select` method). A new method can be
prototyped in Python first: subclass :class:`Method`, override :meth:`Method.token_scores` to return
per-KV-head token scores ``[B, Hkv, P]`` and leave ``core`` as None; the C core then picks the
positions from those scores with the chunk rule (``chunkkv.select_from_scores``). Add it with
:func:`register`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional


@dataclass(frozen=True)
class SelectContext:
    """What a layer's selection call knows besides the tensors."""

    window: int           # the observation window of this forward
    budget: int           # the row's budget for this layer
    length: int           # stored tokens of the layer
    head_dim: int
    scale: float          # the model's attention scale
    keep_fraction: float  # budget / tokens seen, or keep_ratio


@dataclass(frozen=True)
class Method:
    """A compression method as `chunkkv.patch` runs it (the defaults are ChunkKV's)."""

    name: str
    description: str
    core: Optional[str] = None          # the chunkkv.select method that picks positions; None: token_scores()
    window: int = 32                    # observation window (recent tokens kept, for h2o)
    chunk_size: int = 10
    per_head: bool = False              # default selection granularity
    all_queries: bool = False           # score with every prompt query of the forward (h2o)
    pyramid: bool = False               # per-layer budgets shrinking with depth (PyramidKV)
    budget_exact: bool = True           # every row keeps exactly its budget
    takes_row_starts: bool = True       # can select inside left-padded rows
    takes_per_head: bool = True         # can select per KV head
    scores_rule: str = "chunkkv"        # the select_from_scores rule that picks from token_scores()
    reads_scores: bool = True           # False: positions do not depend on attention (the same on every rank)
    options: dict = field(default_factory=dict)   # method options (patch keyword arguments) and their defaults

    #: option names every method takes
    COMMON: ClassVar[tuple] = ()

    @property
    def reusable(self) -> bool:
        """Whether consecutive layers may share one selection (reuse > 1)."""
        return not self.pyramid

    def query_count(self, new_tokens: int, window: int, budget: int) -> int:
        """How many of the forward's last queries score the keys."""
        return new_tokens if self.all_queries else min(window, budget)

    def layer_budget(self, budget: int, window: int, prefix: int, rank: int, layers: int, options: dict) -> int:
        """Budget of the full-attention layer of the given rank, given the row's budget."""
        return budget

    def select_args(self, options: dict, ctx: SelectContext) -> dict:
        """Keyword arguments for chunkkv.select beyond queries, keys, budget and chunk_size."""
        args = {k: v for k, v in {**self.options, **options}.items() if k != "beta"}
        args["scale"] = ctx.scale
        return args

    def token_scores(self, queries: Any, keys: Any, *, scale: float, row_starts: Any) -> Any:
        """Per-KV-head token scores [B, Hkv, P], P = L - w, for a method prototyped in Python."""
        raise NotImplementedError(f"chunkkv: method {self.name!r} has no C core method and no token_scores()")


@dataclass(frozen=True)
class KVPressChunkKV(Method):
    """kvpress's ChunkKVPress(SnapKVPress()): scores with 1/sqrt(head_dim) and counts whole chunks."""

    def select_args(self, options: dict, ctx: SelectContext) -> dict:
        return {**super().select_args(options, ctx), "keep_fraction": ctx.keep_fraction, "scale": ctx.head_dim ** -0.5}


@dataclass(frozen=True)
class PyramidKV(Method):
    """SnapKV scoring with per-layer budgets falling linearly with depth (same total)."""

    def layer_budget(self, budget: int, window: int, prefix: int, rank: int, layers: int, options: dict) -> int:
        return pyramid_budgets(budget, window, prefix, layers, options.get("beta", 20.0))[rank]


@dataclass(frozen=True)
class H2O(Method):
    """Heavy hitters: every prompt query scores; the `window` most recent tokens are kept."""

    def select_args(self, options: dict, ctx: SelectContext) -> dict:
        return {**super().select_args(options, ctx), "window": min(ctx.window, ctx.budget)}


METHODS: dict[str, Method] = {}

#: the method patch() and the integrations run when none is named
DEFAULT = "chunkkv"


def register(method: Method) -> Method:
    """Add a method to the registry (its name must be new); returns it."""
    if not isinstance(method, Method):
        raise TypeError(f"chunkkv.compressors.register: expected a Method, got {type(method).__name__}")
    if method.name in METHODS:
        raise ValueError(f"chunkkv.compressors.register: a method named {method.name!r} exists already")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (for tests and prototypes)."""
    METHODS.pop(name, None)


for _m in [
    Method("chunkkv", "ChunkKV (the paper): whole chunks ranked by window attention; exact budget.", core="chunkkv"),
    KVPressChunkKV("chunkkv-kvpress",
                   "kvpress's ChunkKVPress(SnapKVPress(), chunk_length=20): chunk means over all tokens, whole "
                   "chunks only, so it may keep fewer tokens than asked.", core="chunkkv-kvpress",
                   window=64, chunk_size=20, budget_exact=False, takes_row_starts=False, takes_per_head=False,
                   options={"pool_kernel": 5}),
    Method("snapkv", "SnapKV: per-KV-head top tokens of average-pooled window attention, plus the window.",
           core="snapkv", per_head=True, options={"pool_kernel": 5, "pool": "avg"}),
    PyramidKV("pyramidkv", "PyramidKV: SnapKV scoring with per-layer budgets shrinking linearly with depth "
              "(same total).", core="snapkv", per_head=True, pyramid=True,
              options={"pool_kernel": 5, "pool": "avg", "beta": 20.0}),
    H2O("h2o", "H2O: heavy hitters by the attention every prompt query pays each key, plus recent tokens.",
        core="h2o", per_head=True, all_queries=True),
    Method("streamingllm", "StreamingLLM: the first n_sink tokens and the most recent ones.", core="streamingllm",
           reads_scores=False, options={"n_sink": 4}),
    Method("random", "Random prefix tokens plus the window: a floor for comparisons.", core="random",
           reads_scores=False, options={"seed": 0}),
]:
    register(_m)


def methods() -> dict[str, str]:
    """Every method `chunkkv.patch(method=...)` accepts, with one line each."""
    return {name: m.description for name, m in METHODS.items()}


def get(name: Any) -> Method:
    """The registered method called `name` (ValueError naming the choices otherwise)."""
    if not isinstance(name, str) or name not in METHODS:
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


def kept_budget(budget: Optional[int], keep_ratio: Optional[float], window: int, seen: int) -> int:
    """Tokens a row keeps (window included) after a prefill, given the tokens it has seen:
    `budget`, or ceil(keep_ratio * seen), never below the window (nor above what was seen)."""
    if budget is not None:
        return budget
    return max(int(math.ceil(keep_ratio * seen)), min(window, seen))
