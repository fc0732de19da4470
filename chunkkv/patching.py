"""`chunkkv.patch(model)`: compress every prefill's KV cache with the C core.

How it hooks in (no copy of transformers' forward code):

* a forward pre-hook on the decoder (``model.base_model``) checks the cache kind and records
  the 2-D attention mask of this forward (left padding);
* a forward hook on each full-attention module runs after that layer's prefill attention:
  a *leader* layer recomputes the queries of the last ``window`` prompt tokens with the
  module's own projection, q-norm, RoPE and scaling and asks the C core which positions to keep;
  the next ``reuse - 1`` *follower* layers reuse those indices and only gather;
* the layer's cache entry is replaced by a :class:`chunkkv.cache.CompressedLayer` holding the
  kept tokens (it reports the number of tokens seen, so positions and masks stay right).

Decoding then appends after the kept tokens. ``unpatch`` removes the hooks; the model's
weights and modules are never modified.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import compressors as _methods
from . import ops
from .cache import CompressedLayer, layer_positions

_ATTR = "_chunkkv_patch"
_UNSET = object()  # not computed yet in this forward

#: methods patch() accepts (see chunkkv.methods())
PATCH_METHODS = tuple(_methods.METHODS)


@dataclass
class PatchConfig:
    """What a patch does; see :func:`patch` for the meaning of each field."""

    budget: Optional[int] = None
    keep_ratio: Optional[float] = None
    chunk_size: int = 10
    window: int = 32
    reuse: int = 1
    per_head: bool = False
    method: str = "chunkkv"
    method_args: dict = field(default_factory=dict)

    def budget_for(self, length: int) -> int:
        """Tokens kept per layer on average for a cache of `length` tokens (window included)."""
        if self.budget is not None:
            return self.budget
        return max(int(math.ceil(self.keep_ratio * length)), min(self.window, length))

    def keep_fraction(self, length: int) -> float:
        """The kept fraction, for chunkkv-kvpress (which counts whole chunks)."""
        return self.keep_ratio if self.keep_ratio is not None else min(1.0, self.budget / max(length, 1))


@dataclass
class PatchStats:
    """Counters of what the patch did (handy for tests and logs)."""

    prefills: int = 0      # forwards in which at least one layer was compressed
    selections: int = 0    # C-core select calls (leader layers)
    gathers: int = 0       # C-core gather calls (every compressed layer)


class ChunkKVPatch:
    """The handle `chunkkv.patch` returns: `remove()` (or leaving a `with` block) restores the model."""

    def __init__(self, model: torch.nn.Module, config: PatchConfig) -> None:
        self.model = model
        self.config = config
        self.stats = PatchStats()
        self._hooks: list[Any] = []
        self._mask2d: Optional[torch.Tensor] = None  # this forward's 2-D attention mask
        self._pad_counts: Any = _UNSET  # its leading padding per row, once a layer needs it
        self._group_indices: dict[int, torch.Tensor] = {}  # reuse group -> leader's indices
        self._attention_modules = _find_attention_modules(model)
        self._full_layers = [i for i, m in self._attention_modules if not _is_sliding_module(m)]
        if not self._full_layers:
            raise ValueError("chunkkv.patch: the model has no full-attention layer to compress")
        self._rank = {layer: r for r, layer in enumerate(self._full_layers)}
        self._method = _methods.get(config.method)

    # -- installation -------------------------------------------------------------------------
    def _install(self) -> None:
        decoder = _decoder_of(self.model)
        self._hooks.append(decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True))
        for layer_idx, module in self._attention_modules:
            if layer_idx in self._rank:
                self._hooks.append(module.register_forward_pre_hook(self._make_mask_hook(layer_idx), with_kwargs=True))
                self._hooks.append(module.register_forward_hook(self._make_layer_hook(layer_idx), with_kwargs=True))
        setattr(self.model, _ATTR, self)

    def remove(self) -> None:
        """Remove every hook: the model behaves exactly as before `patch`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    def __enter__(self) -> "ChunkKVPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- hooks --------------------------------------------------------------------------------
    def _before_decoder(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            raise RuntimeError("chunkkv: torch.compile'd forwards are not supported (compression changes cache "
                               "shapes at prefill); compile the model without chunkkv.patch")
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
        self._mask2d = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        self._pad_counts = _UNSET
        self._group_indices.clear()

    def _make_mask_hook(self, layer_idx: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
            return self._fit_mask(layer_idx, args, kwargs)
        return hook

    def _fit_mask(self, layer_idx: int, args: tuple, kwargs: dict) -> Optional[tuple]:
        """Layers may hold fewer tokens than the widest one (PyramidKV, kvpress's chunk rounding): the
        shared 4-D mask is sized for the widest and aligned at the end, so keep its last columns."""
        mask, cache = kwargs.get("attention_mask"), _cache_from(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or cache is None or hidden is None:
            return None
        if layer_idx >= len(cache.layers):
            return None
        layer = cache.layers[layer_idx]
        stored = layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.ndim == 4 else 0
        need = stored + hidden.shape[1]
        if mask.shape[-1] <= need:
            return None
        kwargs["attention_mask"] = mask[..., -need:]
        return args, kwargs

    def _make_layer_hook(self, layer_idx: int) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self._after_attention(layer_idx, module, args, kwargs)
        return hook

    def _after_attention(self, layer_idx: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = _cache_from(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or hidden.shape[1] < 2 or layer_idx >= len(cache.layers):
            return  # no cache, or a decoding step: nothing to compress
        layer = cache.layers[layer_idx]
        if getattr(layer, "is_sliding", False) or not isinstance(layer, DynamicLayer) or layer.keys is None:
            return
        keys, values = layer.keys, layer.values
        L = keys.shape[-2]
        cfg, method = self.config, self._method
        rank = self._rank[layer_idx]
        window = min(cfg.window, hidden.shape[1])
        budget = _methods.layer_budget(method, cfg.budget_for(L), window, L - window, rank, len(self._full_layers),
                                       cfg.method_args.get("beta"))
        if method.budget_exact and L <= budget:
            return
        if not method.budget_exact and cfg.keep_fraction(L) >= 1.0:
            return
        positions = layer_positions(layer)
        starts = self._row_starts(positions)
        group, member = divmod(rank, cfg.reuse)
        with torch.no_grad():
            if member == 0 or group not in self._group_indices:
                self._group_indices[group] = self._select(module, hidden, kwargs, keys, budget, window, starts)
                self.stats.selections += 1
                if rank == 0:
                    self.stats.prefills += 1
            indices = self._group_indices[group]
            kept_k, kept_v = ops.gather(keys, values, indices)
            self.stats.gathers += 1
            if indices.ndim == 3 and positions.ndim == 2:
                positions = positions.unsqueeze(1).expand(-1, indices.shape[1], -1)
            elif indices.ndim == 2 and positions.ndim == 3:
                positions = positions[:, 0]
            kept_positions = torch.take_along_dim(positions, indices.to(positions.device), dim=-1)
        peers = getattr(cache, "_chunkkv_peers", None)
        if peers is None:
            peers = []
            cache._chunkkv_peers = peers
        new_layer = CompressedLayer(kept_k, kept_v, kept_positions, layer.get_seq_length(), peers=peers)
        peers[:] = [p for p in peers if p is not layer]
        peers.append(new_layer)
        cache.layers[layer_idx] = new_layer

    def _select(self, module: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, keys: torch.Tensor, budget: int,
                window: int, starts: Optional[list[int]]) -> torch.Tensor:
        """The leader's positions, from the C core."""
        cfg, method = self.config, self._method
        n_queries = hidden.shape[1] if method.all_queries else min(window, budget)
        queries = window_queries(module, hidden, kwargs, n_queries)
        args = {**method.select_args, **{k: v for k, v in cfg.method_args.items() if k != "beta"}}
        if method.core == "h2o":
            args["window"] = min(window, budget)
        if method.core == "chunkkv-kvpress":
            args["keep_fraction"] = cfg.keep_fraction(keys.shape[-2])
            args["scale"] = keys.shape[-1] ** -0.5  # kvpress scores with 1/sqrt(head_dim)
        else:
            args["scale"] = float(getattr(module, "scaling", queries.shape[-1] ** -0.5))
            args["row_starts"] = starts
            args["per_head"] = cfg.per_head
        return ops.select(queries, keys, budget=budget, chunk_size=cfg.chunk_size, method=method.core, **args)

    def _padding_counts(self) -> Optional[torch.Tensor]:
        """Leading padding tokens per row of this forward's 2-D mask (None without padding); checked and
        computed once per forward, at the first layer that compresses."""
        if self._pad_counts is _UNSET:
            mask = self._mask2d
            if mask is None or bool(mask.all()):
                self._pad_counts = None
            else:
                m = mask.to(torch.bool)
                zeros_so_far = (~m).to(torch.int64).cumsum(-1)
                # left padding only: the j-th column is padding only if all columns before it are too
                if not bool(((zeros_so_far == torch.arange(1, m.shape[1] + 1, device=m.device)) | m).all()):
                    raise ValueError("chunkkv: attention_mask must be left-padded (zeros only before a row's first "
                                     "token); use tokenizer.padding_side = 'left'")
                self._pad_counts = zeros_so_far[:, -1]
        return self._pad_counts

    def _row_starts(self, positions: torch.Tensor) -> Optional[list[int]]:
        """Per row, how many stored slots are left padding (they lead, as positions are sorted)."""
        n_pad = self._padding_counts()
        if n_pad is None:
            return None
        pos = positions if positions.ndim == 2 else positions[:, 0]
        return (pos < n_pad.to(pos.device).unsqueeze(-1)).sum(-1).tolist()


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
        q = module.q_proj(h)
    else:
        q = module.qkv_proj(h)[..., : n_heads * D]
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
          per_head: Optional[bool] = None, method: str = "chunkkv", **method_args: Any) -> ChunkKVPatch:
    """Make `model` compress its KV cache at every prefill with ChunkKV (or another method).

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3, ...).
        budget: tokens kept per layer, window included (>= window). Exactly one of budget and
            keep_ratio is given.
        keep_ratio: fraction of the prompt kept per layer, window included, in (0, 1].
        chunk_size: tokens per chunk (default 10; 20 for chunkkv-kvpress).
        window: observation window: the last `window` prompt tokens score the rest and are kept
            (default 32; 64 for chunkkv-kvpress; the recent tokens for h2o).
        reuse: layer-wise index reuse: consecutive blocks of `reuse` full-attention layers share
            the indices their first layer computes; the others only gather.
        per_head: select separately for each KV head (default: False for chunkkv and streamingllm,
            True for snapkv, pyramidkv and h2o, as in their papers).
        method: one of chunkkv.methods() (chunkkv, chunkkv-kvpress, snapkv, pyramidkv, h2o,
            streamingllm, random).
        **method_args: passed to chunkkv.select (pool_kernel, pool, n_sink, seed); beta for pyramidkv.

    Returns a handle; `handle.remove()`, `chunkkv.unpatch(model)` or leaving `with chunkkv.patch(...)`
    restores the model. Prefill forwards then replace each full-attention layer's cache with its
    kept tokens; decoding appends after them. Sliding-window layers are left as they are.
    """
    spec = _methods.get(method)
    if (budget is None) == (keep_ratio is None):
        raise ValueError("chunkkv.patch: give exactly one of budget (tokens) or keep_ratio (fraction)")
    window = ops._int_arg(spec.window if window is None else window, "window", 1)
    chunk_size = ops._int_arg(spec.chunk_size if chunk_size is None else chunk_size, "chunk_size", 1)
    reuse = ops._int_arg(reuse, "reuse", 1)
    if budget is not None:
        budget = ops._int_arg(budget, "budget", 1)
        if budget < window and spec.budget_exact:
            raise ValueError(f"budget: expected >= window ({window}), got {budget}: the window is always kept")
    else:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
            raise TypeError(f"keep_ratio: expected a float, got {type(keep_ratio).__name__}")
        if not 0.0 < float(keep_ratio) <= 1.0:
            raise ValueError(f"keep_ratio: expected a fraction in (0, 1], got {keep_ratio}")
        keep_ratio = float(keep_ratio)
    if per_head is None:
        per_head = spec.per_head
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head: expected a bool, got {type(per_head).__name__}")
    if spec.pyramid and reuse > 1:
        raise ValueError("reuse: pyramidkv gives every layer its own budget, so layers cannot share indices; use reuse=1")
    if spec.core == "chunkkv-kvpress" and per_head:
        raise ValueError("per_head: chunkkv-kvpress selects one set of chunks per row, as kvpress does")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("chunkkv.patch: the model is already patched; call chunkkv.unpatch(model) first")
    config = PatchConfig(budget=budget, keep_ratio=keep_ratio, chunk_size=chunk_size, window=window, reuse=reuse,
                         per_head=per_head, method=method, method_args=dict(method_args))
    handle = ChunkKVPatch(model, config)
    handle._install()
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Remove chunkkv's hooks from `model` (a no-op when it is not patched)."""
    handle = getattr(model, _ATTR, None)
    if handle is not None:
        handle.remove()
