"""`chunkkv.patch(model)`: compress every prefill's KV cache with the C core.

How it hooks in (no copy of transformers' forward code):

* a forward pre-hook on the decoder (``model.base_model``) checks the cache kind and opens a
  :class:`ForwardState` for this forward (its 2-D attention mask, its padding, the reuse groups'
  indices); a forward hook closes it when the forward ends, even by an exception. States live in a
  per-thread stack, so any number of threads can run one patched model at once;
* a forward hook on each full-attention module runs after that layer's prefill attention: a
  *leader* layer recomputes the queries of the last ``window`` prompt tokens with the module's own
  projection, q-norm, RoPE and scaling and asks the C core which positions to keep; the next
  ``reuse - 1`` *follower* layers reuse those indices and only gather;
* :func:`compress_layer` turns the layer's cache entry into a :class:`chunkkv.cache.CompressedLayer`
  holding the kept tokens (it reports the number of tokens seen, so positions and masks stay right);
* a forward pre-hook on each full-attention module fits the shared attention mask to the layer
  (layers may hold different numbers of tokens) and masks slots that hold no token.

Decoding then appends after the kept tokens. ``unpatch`` removes the hooks; the model's weights
and modules are never modified. Which method runs and how it behaves comes from the registry in
:mod:`chunkkv.compressors`.
"""
from __future__ import annotations

import difflib
import inspect
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import compressors as _registry
from . import ops
from .cache import CompressedLayer, layer_positions

_ATTR = "_chunkkv_patch"
_UNSET = object()  # not computed yet in this forward

#: methods patch() accepts (see chunkkv.methods())
PATCH_METHODS = tuple(_registry.METHODS)


@dataclass(frozen=True)
class PatchConfig:
    """What a patch does (see :func:`patch` for each field); checks itself when it is made.

    `PatchConfig.create(...)` fills a method's defaults and rejects unknown options."""

    budget: Optional[int] = None
    keep_ratio: Optional[float] = None
    chunk_size: int = 10
    window: int = 32
    reuse: int = 1
    per_head: bool = False
    method: str = _registry.DEFAULT
    method_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = _registry.get(self.method)
        if (self.budget is None) == (self.keep_ratio is None):
            raise ValueError("chunkkv.patch: give exactly one of budget (tokens) or keep_ratio (fraction)")
        ops._int_arg(self.window, "window", 1)
        ops._int_arg(self.chunk_size, "chunk_size", 1)
        ops._int_arg(self.reuse, "reuse", 1)
        if self.budget is not None:
            ops._int_arg(self.budget, "budget", 1)
            if self.budget < self.window and spec.budget_exact:
                raise ValueError(f"budget: expected >= window ({self.window}), got {self.budget}: the window is "
                                 "always kept")
        else:
            if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)):
                raise TypeError(f"keep_ratio: expected a float, got {type(self.keep_ratio).__name__}")
            if not 0.0 < float(self.keep_ratio) <= 1.0:
                raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {self.keep_ratio}")
        if not isinstance(self.per_head, bool):
            raise TypeError(f"per_head: expected a bool, got {type(self.per_head).__name__}")
        if not spec.reusable and self.reuse > 1:
            raise ValueError(f"reuse: {spec.name} gives every layer its own budget, so layers cannot share "
                             "indices; use reuse=1")
        if self.per_head and not spec.takes_per_head:
            raise ValueError(f"per_head: {spec.name} selects one set of positions per row")
        unknown = sorted(set(self.method_args) - set(spec.options))
        if unknown:
            known = ["budget", "keep_ratio", "chunk_size", "window", "reuse", "per_head", "method", *spec.options]
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"chunkkv.patch: unexpected argument {unknown[0]!r}{hint}; method {spec.name!r} takes "
                            f"{', '.join(repr(k) for k in known)}")

    @classmethod
    def create(cls, budget: Optional[int] = None, keep_ratio: Optional[float] = None,
               chunk_size: Optional[int] = None, window: Optional[int] = None, reuse: int = 1,
               per_head: Optional[bool] = None, method: str = _registry.DEFAULT, **method_args: Any) -> "PatchConfig":
        """A checked config with the method's defaults for the options not given."""
        spec = _registry.get(method)
        keep_ratio = float(keep_ratio) if isinstance(keep_ratio, int) and not isinstance(keep_ratio, bool) \
            else keep_ratio
        return cls(budget=budget, keep_ratio=keep_ratio,
                   chunk_size=spec.chunk_size if chunk_size is None else chunk_size,
                   window=spec.window if window is None else window, reuse=reuse,
                   per_head=spec.per_head if per_head is None else per_head, method=method,
                   method_args=dict(method_args))

    @property
    def spec(self) -> _registry.Method:
        """The registry entry of this config's method."""
        return _registry.get(self.method)

    def row_budget(self, seen: int, window: int) -> int:
        """Tokens a row keeps after a prefill (window included), given the tokens it has seen."""
        return _registry.kept_budget(self.budget, self.keep_ratio, window, seen)

    def keep_fraction(self, seen: int) -> float:
        """The kept fraction, for methods that count whole chunks rather than tokens."""
        return self.keep_ratio if self.keep_ratio is not None else min(1.0, self.budget / max(seen, 1))


@dataclass
class PatchStats:
    """Counters of what the patch did (handy for tests and logs); updated under a lock."""

    prefills: int = 0      # forwards in which at least one layer was compressed
    selections: int = 0    # C-core select calls (leader layers)
    gathers: int = 0       # C-core gather calls (every compressed layer)


@dataclass
class Selection:
    """A reuse group's choice: stored slots to keep per row, right-aligned.

    indices: [B, n] or [B, Hkv, n] int64 slots of the layer; a row that keeps fewer than n tokens
    (its own budget is smaller) starts with `dead[r]` filler slots, which hold no token and are masked.
    """

    indices: torch.Tensor
    dead: Optional[list[int]] = None
    length: int = 0  # stored slots of the leader when it chose


class ForwardState:
    """What one decoder forward knows: made when it starts, dropped when it ends."""

    def __init__(self, mask2d: Optional[torch.Tensor]) -> None:
        self.mask2d = mask2d
        self.groups: dict[int, Optional[Selection]] = {}  # reuse group -> the leader's choice (None: kept all)
        self._pad_counts: Any = _UNSET

    def pad_counts(self) -> Optional[list[int]]:
        """Leading padding tokens per row of this forward's 2-D mask (None without padding); checked
        and computed once per forward, at the first layer that compresses."""
        if self._pad_counts is _UNSET:
            mask = self.mask2d
            if mask is None or bool(mask.all()):
                self._pad_counts = None
            else:
                m = mask.to(torch.bool)
                zeros_so_far = (~m).to(torch.int64).cumsum(-1)
                # left padding only: the j-th column is padding only if all columns before it are too
                if not bool(((zeros_so_far == torch.arange(1, m.shape[1] + 1, device=m.device)) | m).all()):
                    raise ValueError("chunkkv: attention_mask must be left-padded (zeros only before a row's first "
                                     "token); use tokenizer.padding_side = 'left'")
                self._pad_counts = zeros_so_far[:, -1].tolist()
        return self._pad_counts


class Hooks:
    """Installs and removes a set of torch hooks; nothing else."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ChunkKVPatch:
    """The handle `chunkkv.patch` returns: `remove()` (or leaving a `with` block) restores the model."""

    def __init__(self, model: torch.nn.Module, config: PatchConfig) -> None:
        self.model = model
        self.config = config
        self.stats = PatchStats()
        self._stats_lock = threading.Lock()
        self._hooks = Hooks()
        self._local = threading.local()  # .forwards: this thread's stack of ForwardState
        self._attention_modules = _find_attention_modules(model)
        self._full_layers = [i for i, m in self._attention_modules if not _is_sliding_module(m)]
        if not self._full_layers:
            raise ValueError("chunkkv.patch: the model has no full-attention layer to compress")
        self._rank = {layer: r for r, layer in enumerate(self._full_layers)}

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        decoder = _decoder_of(self.model)
        self._hooks.add(self.model.register_forward_pre_hook(self._refuse_compiled_forward))
        self._hooks.add(decoder.register_forward_pre_hook(self._open_forward, with_kwargs=True))
        self._hooks.add(decoder.register_forward_hook(self._close_forward, always_call=True))
        for layer_idx, module in self._attention_modules:
            if layer_idx in self._rank:
                self._hooks.add(module.register_forward_pre_hook(self._make_mask_hook(layer_idx), with_kwargs=True))
                self._hooks.add(module.register_forward_hook(self._make_layer_hook(layer_idx), with_kwargs=True))
        setattr(self.model, _ATTR, self)

    def remove(self) -> None:
        """Remove every hook: the model behaves exactly as before `patch`."""
        self._hooks.remove()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    def __enter__(self) -> "ChunkKVPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + d)

    # -- per-forward state --------------------------------------------------------------------
    def _stack(self) -> list[ForwardState]:
        stack = getattr(self._local, "forwards", None)
        if stack is None:
            stack = self._local.forwards = []
        return stack

    def _current(self) -> Optional[ForwardState]:
        stack = self._stack()
        return stack[-1] if stack else None

    # -- hooks --------------------------------------------------------------------------------
    def _refuse_compiled_forward(self, module: torch.nn.Module, args: tuple) -> None:
        # runs eagerly before `model.forward`; a forward replaced by torch.compile(...) is seen here
        _refuse_compile(_is_compiled(module.forward) or _is_compiled(_decoder_of(module).forward))

    def _open_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        _refuse_compile(torch.compiler.is_compiling())
        cache = _cache_from(kwargs)
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"chunkkv: expected a transformers Cache, got {type(cache).__name__} (legacy tuple caches "
                            "are not supported)")
        if cache is not None:
            for layer_idx in self._full_layers:
                if layer_idx < len(cache.layers) and not isinstance(cache.layers[layer_idx], DynamicLayer):
                    raise TypeError(f"chunkkv: layer {layer_idx} of the cache is a {type(cache.layers[layer_idx]).__name__}; "
                                    "compression needs a DynamicCache (StaticCache and quantized or offloaded caches "
                                    "have fixed-size layers). Use the default cache.")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._stack().append(ForwardState(mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None))

    def _close_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        stack = self._stack()
        if stack:
            stack.pop()

    def _make_mask_hook(self, layer_idx: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
            return fit_layer_mask(layer_idx, args, kwargs)
        return hook

    def _make_layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._after_attention(layer_idx, module, args, kwargs)
        return hook

    def _after_attention(self, layer_idx: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._current()
        cache = _cache_from(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if state is None or cache is None or hidden is None or hidden.shape[1] < 2 or layer_idx >= len(cache.layers):
            return  # outside a decoder forward, no cache, or a decoding step: nothing to compress
        layer = cache.layers[layer_idx]
        if getattr(layer, "is_sliding", False) or not isinstance(layer, DynamicLayer) or layer.keys is None:
            return
        rank = self._rank[layer_idx]
        group, member = divmod(rank, self.config.reuse)
        with torch.no_grad():
            if member == 0 or group not in state.groups:
                state.groups[group] = self._choose(state, rank, module, hidden, kwargs, layer)
                if state.groups[group] is not None:
                    self._count(selections=1, prefills=int(rank == 0))
            selection = state.groups[group]
            if selection is None:
                return
            if selection.length != layer.keys.shape[-2]:
                raise RuntimeError(f"chunkkv: layer {layer_idx} holds {layer.keys.shape[-2]} tokens but its reuse "
                                   f"leader chose among {selection.length}")
            cache.layers[layer_idx] = compress_layer(layer, selection, _compressed_peers(cache, layer))
            self._count(gathers=1)

    def _choose(self, state: ForwardState, rank: int, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict,
                layer: DynamicLayer) -> Optional[Selection]:
        """The leader's selection for its reuse group, or None when every row keeps all it holds."""
        cfg, spec = self.config, self.config.spec
        keys = layer.keys
        B, L = keys.shape[0], keys.shape[-2]
        seen = layer.get_seq_length()
        window = min(cfg.window, hidden.shape[1])
        pads = state.pad_counts()
        positions = layer_positions(layer)
        starts = _row_starts(positions, pads)
        if starts is not None and not spec.takes_row_starts:
            raise ValueError(f"chunkkv: method {spec.name!r} cannot select inside left-padded rows; use batch size 1 "
                             f"or method={_registry.DEFAULT!r}")
        firsts = starts or [0] * B
        seen_rows = [seen - (pads[r] if pads else 0) for r in range(B)]
        budgets = [spec.layer_budget(cfg.row_budget(seen_rows[r], window), window, L - firsts[r] - window, rank,
                                     len(self._full_layers), cfg.method_args) for r in range(B)]
        if spec.budget_exact:
            if all(budgets[r] >= L - firsts[r] for r in range(B)):
                return None  # no row drops a token
        elif cfg.keep_fraction(seen) >= 1.0:
            return None
        n_queries = spec.query_count(hidden.shape[1], window, max(budgets))
        queries = window_queries(module, hidden, kwargs, n_queries)
        scale = float(getattr(module, "scaling", queries.shape[-1] ** -0.5))
        # tensor parallel: this rank holds some heads; a shared selection needs every rank's scores
        ranks = RankScores.of(module, queries.shape[1]) if not cfg.per_head else None
        if ranks is not None and spec.core is not None and spec.reads_scores and spec.core not in ranks.SUMMABLE:
            raise ValueError(f"chunkkv: method {spec.name!r} cannot run under tensor parallelism (this rank holds "
                             f"{queries.shape[1]} of {module.config.num_attention_heads} query heads, and the method "
                             "ranks pooled per-head scores the ranks cannot combine); use method="
                             f"{_registry.DEFAULT!r}")

        def select(q: torch.Tensor, k: torch.Tensor, budget: int, row_starts: Optional[list[int]]) -> torch.Tensor:
            args = spec.select_args(cfg.method_args, _registry.SelectContext(
                window=window, budget=budget, length=L, head_dim=k.shape[-1], scale=scale,
                keep_fraction=cfg.keep_fraction(seen)))
            if spec.takes_row_starts:
                args.update(row_starts=row_starts, per_head=cfg.per_head)
            budget = max(budget, window) if spec.budget_exact else budget
            if spec.core is None:  # a method prototyped in Python: its scores, the C core's chunk pick
                scores = spec.token_scores(q, k, scale=scale, row_starts=row_starts).to(torch.float32)
                scores = scores if cfg.per_head else scores.sum(1)
                if ranks is not None:
                    scores = ranks.sum(scores)
                return ops.select_from_scores(scores, length=L, budget=budget, chunk_size=cfg.chunk_size,
                                              method=spec.scores_rule, row_starts=row_starts)
            if ranks is not None and spec.core in ranks.SUMMABLE:
                # score()'s head sums, summed over the ranks, pick what select() picks from all heads
                prefix = L - int(args.get("window", q.shape[-2]))
                scores = ranks.sum(ops.score(q, k, scale=scale, row_starts=row_starts, prefix=prefix).sum(1))
                return ops.select_from_scores(scores, length=L, budget=budget, chunk_size=cfg.chunk_size,
                                              method=spec.core, row_starts=row_starts,
                                              pool_kernel=int(args.get("pool_kernel", 1)),
                                              pool=args.get("pool", "avg"))
            return ops.select(q, k, budget=budget, chunk_size=cfg.chunk_size, method=spec.core, **args)

        if len(set(budgets)) == 1:
            return Selection(select(queries, keys, budgets[0], starts), None, L)
        # rows keep different numbers of tokens (keep_ratio in a padded batch): one call per row
        # on views of that row, right-aligned in a common width; the leading gap is filler
        rows = [select(queries[r:r + 1], keys[r:r + 1], budgets[r], [firsts[r]]) for r in range(B)]
        width = max(int(x.shape[-1]) for x in rows)
        dead = [width - int(x.shape[-1]) for x in rows]
        indices = torch.cat([torch.cat([x[..., :1].expand(*x.shape[:-1], d), x], dim=-1)
                             for x, d in zip(rows, dead)], dim=0)
        return Selection(indices, dead if any(dead) else None, L)


class RankScores:
    """Sums per-token scores over the ranks that share a layer's heads (transformers' tensor parallelism).

    Under `from_pretrained(..., tp_plan="auto")` each rank's q_proj and k_proj give plain tensors of its
    own heads, and its cache holds only those heads. A selection shared by all heads (ChunkKV) ranks
    the scores summed over every head, so each rank sums its heads, the ranks all-reduce that sum over
    the layer's process group, and every rank then picks the same positions. Per-head selections
    need no communication: each head's choice depends on its own scores only.
    """

    #: core methods whose shared selection is a function of the head-summed token scores
    SUMMABLE = ops._SCORE_METHODS

    def __init__(self, group: Any) -> None:
        self.group = group

    @classmethod
    def of(cls, module: torch.nn.Module, local_heads: int) -> Optional["RankScores"]:
        """The score combiner of `module` when it holds only `local_heads` of its query heads (None when
        it holds them all); raises when the heads are split but no process group can be found."""
        total = getattr(getattr(module, "config", None), "num_attention_heads", None)
        if not isinstance(total, int) or local_heads >= total:
            return None
        group = _tensor_parallel_group(module)
        if group is None:
            raise ValueError(f"chunkkv: layer {module.layer_idx} holds {local_heads} of {total} query heads but its "
                             "q_proj weight is not a sharded DTensor, so the ranks holding the other heads are "
                             "unknown; load the model with transformers' tp_plan")
        return cls(group)

    def sum(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` (this rank's head sums, float32) summed over the ranks, in place; every rank gets the same."""
        scores = scores.contiguous()
        torch.distributed.all_reduce(scores, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return scores


def _tensor_parallel_group(module: torch.nn.Module) -> Any:
    """The process group over which `module`'s query projection is sharded, or None."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor import DTensor, Shard

    proj = getattr(module, "q_proj", None)
    weight = getattr(proj, "weight", None)
    if not isinstance(weight, DTensor) or not any(isinstance(p, Shard) for p in weight.placements):
        return None
    mesh = weight.device_mesh
    if mesh.ndim == 1:
        return mesh.get_group()
    names = mesh.mesh_dim_names or ()
    return mesh.get_group("tp") if "tp" in names else None


def _row_starts(positions: Optional[torch.Tensor], pads: Optional[list[int]]) -> Optional[list[int]]:
    """Per row, how many stored slots hold no token of the row: left padding and filler slots (they lead,
    as stored positions are sorted and filler slots have position -1). None when there are none."""
    if positions is None:
        return None
    pos = positions if positions.ndim == 2 else positions[:, 0]
    if pads is None:
        if not isinstance(positions, torch.Tensor) or not bool((pos[:, 0] < 0).any()):
            return None
        pads = [0] * pos.shape[0]
    bound = torch.tensor(pads, device=pos.device).unsqueeze(-1)
    return (pos < bound).sum(-1).tolist()


def _compressed_peers(cache: Cache, replaced: DynamicLayer) -> list:
    """The list the compressed layers of this cache share (the mask is sized for the widest of them),
    without the layer being replaced."""
    peers = next((la.peers for la in cache.layers if isinstance(la, CompressedLayer)), [])
    peers[:] = [p for p in peers if p is not replaced]
    return peers


def compress_layer(layer: DynamicLayer, selection: Selection, peers: Optional[list] = None) -> CompressedLayer:
    """The cache layer holding only the slots `selection` keeps (filler slots get position -1)."""
    indices = selection.indices
    if indices.device != layer.keys.device:  # a follower on another device than its leader (device_map)
        indices = indices.to(layer.keys.device)
    kept_k, kept_v = ops.gather(layer.keys, layer.values, indices)
    positions = layer_positions(layer)
    if indices.ndim == 3 and positions.ndim == 2:
        positions = positions.unsqueeze(1).expand(-1, indices.shape[1], -1)
    elif indices.ndim == 2 and positions.ndim == 3:
        positions = positions[:, 0]
    kept = torch.take_along_dim(positions, indices.to(positions.device), dim=-1)
    if selection.dead is not None:
        slot = torch.arange(kept.shape[-1], device=kept.device)
        filler = slot < torch.tensor(selection.dead, device=kept.device).view(-1, *([1] * (kept.ndim - 1)))
        kept = kept.masked_fill(filler, -1)
    may_have_filler = selection.dead is not None or getattr(layer, "filler", None) is not None
    new_layer = CompressedLayer(kept_k, kept_v, kept, layer.get_seq_length(),
                                peers=peers if peers is not None else [], may_have_filler=may_have_filler)
    new_layer.peers.append(new_layer)
    return new_layer


def fit_layer_mask(layer_idx: int, args: tuple, kwargs: dict) -> Optional[tuple]:
    """Fit the shared 4-D mask to one layer before its attention.

    Layers may hold fewer tokens than the widest one (PyramidKV, kvpress's chunk rounding): the mask
    is sized for the widest and aligned at the end, so the layer keeps its last columns. Filler slots
    (a row that keeps fewer tokens than the layer's width) are masked here."""
    mask, cache = kwargs.get("attention_mask"), _cache_from(kwargs)
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if cache is None or hidden is None or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    stored = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.ndim == 4 else 0
    q = hidden.shape[1]
    need = stored + q
    dead = getattr(layer, "filler", None) if isinstance(layer, CompressedLayer) else None
    if dead is None:
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or mask.shape[-1] <= need:
            return None
        kwargs["attention_mask"] = mask[..., -need:]
        return args, kwargs
    B = hidden.shape[0]
    if mask is None:  # sdpa's causal fast path: an additive causal mask over stored + new slots
        col = torch.arange(need, device=hidden.device)
        row = torch.arange(q, device=hidden.device).unsqueeze(-1)
        blocked = (col > stored + row).expand(B, 1, q, need)
        mask = torch.zeros(blocked.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(blocked, torch.finfo(hidden.dtype).min)
    elif not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise TypeError(f"chunkkv: cannot mask filler slots in an attention mask of type {type(mask).__name__}; "
                        "use attn_implementation='sdpa' or 'eager'")
    mask = mask[..., -need:] if mask.shape[-1] > need else mask
    mask = mask.expand(B, *mask.shape[1:]).clone()
    filler = torch.arange(need, device=mask.device) < dead.to(mask.device).view(-1, 1, 1, 1)
    if mask.dtype == torch.bool:
        mask = mask & ~filler
    else:
        mask = mask.masked_fill(filler, torch.finfo(mask.dtype).min)
    kwargs["attention_mask"] = mask
    return args, kwargs


# -- torch.compile ---------------------------------------------------------------------------------
_COMPILE_MESSAGE = ("chunkkv: torch.compile is not supported with chunkkv.patch (compression changes the cache's "
                    "shapes at every prefill); run the patched model uncompiled, or compile it without chunkkv.patch")


@torch.compiler.disable
def _refuse_compile(compiling: bool) -> None:
    # disabled for Dynamo: while tracing, `compiling` is the constant True and this call runs eagerly
    # (a graph break), so the error reaches the caller as it is rather than inside Dynamo's own
    if compiling:
        raise RuntimeError(_COMPILE_MESSAGE)


def _is_compiled(fn: Any) -> bool:
    return getattr(fn, "_torchdynamo_orig_callable", None) is not None or \
        type(fn).__name__ == "OptimizedModule"


# -- model introspection -------------------------------------------------------------------------
def _decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def _find_attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer_idx, module) of every self-attention module with its own projections."""
    found: dict[int, torch.nn.Module] = {}
    for _, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        has_q = hasattr(module, "q_proj") or hasattr(module, "qkv_proj")
        if isinstance(idx, int) and has_q and hasattr(module, "head_dim") and idx not in found:
            found[idx] = module
    if not found:
        raise ValueError(f"chunkkv.patch: no attention module with q_proj/qkv_proj and layer_idx found in "
                         f"{type(model).__name__}; this architecture is not supported")
    return sorted(found.items())


def _is_sliding_module(module: torch.nn.Module) -> bool:
    if getattr(module, "is_sliding", False):
        return True
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    idx = module.layer_idx
    return bool(layer_types) and idx < len(layer_types) and layer_types[idx] != "full_attention"


def _cache_from(kwargs: dict) -> Any:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def window_queries(module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, window: int) -> torch.Tensor:
    """Queries of the last `window` tokens, [B, Hq, w, D], exactly as `module` computes them.

    Uses the module's own projection (q_proj, or the query part of a fused qkv_proj), its q-norm
    when it has one, and its model file's apply_rotary_pos_emb with the position embeddings the
    module received.
    """
    h = hidden[:, -window:]
    D = module.head_dim
    n_heads = module.config.num_attention_heads
    if hasattr(module, "q_proj"):
        q = module.q_proj(h)  # under tensor parallelism: this rank's heads
    else:
        qkv = module.qkv_proj(h)
        n_kv = getattr(module.config, "num_key_value_heads", None) or n_heads
        if qkv.shape[-1] < (n_heads + 2 * n_kv) * D:
            raise ValueError(f"chunkkv: {type(module).__name__}.qkv_proj gives {qkv.shape[-1]} features, fewer than "
                             f"the {(n_heads + 2 * n_kv) * D} of all heads (tensor parallelism?); a sharded fused "
                             "qkv_proj is not supported")
        q = qkv[..., : n_heads * D]
    q = q.view(h.shape[0], window, -1, D)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    pe = kwargs.get("position_embeddings")
    if pe is None:
        raise ValueError(f"chunkkv: {type(module).__name__} received no position_embeddings; models that rotate "
                         "inside the attention module are not supported")
    cos, sin = pe
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rope is None:
        raise ValueError(f"chunkkv: {type(module).__module__} has no apply_rotary_pos_emb")
    q, _ = rope(q, q, cos[:, -window:], sin[:, -window:])
    return q


# -- public entry points -------------------------------------------------------------------------
def patch(model: torch.nn.Module, budget: Optional[int] = None, keep_ratio: Optional[float] = None,
          chunk_size: Optional[int] = None, window: Optional[int] = None, reuse: int = 1,
          per_head: Optional[bool] = None, method: str = _registry.DEFAULT, **method_args: Any) -> ChunkKVPatch:
    """Make `model` compress its KV cache at every prefill with ChunkKV (or another method).

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, ...).
        budget: tokens kept per layer and row after each prefill, window included (>= window).
            Exactly one of budget and keep_ratio is given.
        keep_ratio: fraction kept, window included, in (0, 1]: after each prefill a row holds
            ceil(keep_ratio * tokens it has seen) per layer (at least the window). In a left-padded
            batch each row counts its own tokens; in a multi-turn chat, the tokens of all turns.
        chunk_size: tokens per chunk (default 10; 20 for chunkkv-kvpress).
        window: observation window: the last `window` prompt tokens score the rest and are kept
            (default 32; 64 for chunkkv-kvpress; the recent tokens for h2o).
        reuse: layer-wise index reuse: consecutive blocks of `reuse` full-attention layers share
            the indices their first layer computes; the others only gather.
        per_head: select separately for each KV head (default: False for chunkkv and streamingllm,
            True for snapkv, pyramidkv and h2o, as in their papers).
        method: one of chunkkv.methods() (chunkkv, chunkkv-kvpress, snapkv, pyramidkv, h2o,
            streamingllm, random).
        **method_args: the method's options (pool_kernel, pool, n_sink, seed; beta for pyramidkv);
            anything else is a TypeError naming it.

    Returns a handle; `handle.remove()`, `chunkkv.unpatch(model)` or leaving `with chunkkv.patch(...)`
    restores the model. Prefill forwards then replace each full-attention layer's cache with its
    kept tokens; decoding appends after them. Sliding-window layers are left as they are. One
    patched model may be used from several threads at once.
    """
    config = PatchConfig.create(budget=budget, keep_ratio=keep_ratio, chunk_size=chunk_size, window=window,
                                reuse=reuse, per_head=per_head, method=method, **method_args)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("chunkkv.patch: the model is already patched; call chunkkv.unpatch(model) first")
    handle = ChunkKVPatch(model, config)
    handle._install()
    return handle


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which `model(...)` and `model.generate(...)` take a cache: "cache" in the
    transformers releases that renamed it, "past_key_values" before (which those ignore silently)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def unpatch(model: torch.nn.Module) -> None:
    """Remove chunkkv's hooks from `model` (a no-op when it is not patched)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()
