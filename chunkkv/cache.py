"""The cache layer a full-attention layer becomes after ChunkKV compression.

After prefill a layer holds only the kept tokens, but the model has seen more. The layer
therefore keeps two lengths apart:

* ``get_seq_length()`` is the number of tokens the model has seen, so position ids and the
  next ``cache_position`` stay those of the full sequence;
* ``get_mask_sizes(q)`` is ``(stored + q, seen - stored)``: the mask has one column per stored
  token plus the new ones, placed at the absolute columns ``[seen - stored, seen + q)``, so
  causality among new tokens is exact and the 2-D padding mask of a left-padded batch reads the
  columns of the most recent tokens (chunkkv keeps a short row's last tokens, so these columns
  say exactly which stored slots are real).

Layers of one cache may hold different numbers of tokens (PyramidKV): the mask is then sized for
the widest and each narrower layer reads its last columns.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer


class CompressedLayer(DynamicLayer):
    """A dynamic full-attention cache layer holding only the tokens ChunkKV kept.

    keys, values: [B, Hkv, n, D]; positions: absolute positions of the kept tokens, [B, n]
    (shared selection) or [B, Hkv, n] (per-head selection), -1 for a filler slot (a row that keeps
    fewer tokens than the layer's width starts with filler slots, which attention must not see);
    seen: tokens the model has seen.
    """

    is_sliding = False
    is_croppable = True  # tokens appended after compression can be cropped (crop() refuses the rest)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, seen: int,
                 peers: Optional[list] = None, may_have_filler: bool = True) -> None:
        super().__init__()
        # the compressed layers of the same cache: the mask is sized for the widest of them
        self.peers = peers if peers is not None else [self]
        self.device = keys.device
        self.keys, self.values = keys, values
        self.is_initialized = True
        self._kept_positions = positions
        self._seen_at_compression = int(seen)
        self.seen = int(seen)
        #: leading filler slots per row, [B] int64 on the CPU, or None when every slot holds a token
        self.filler: Optional[torch.Tensor] = None
        if may_have_filler:
            count = ((positions if positions.ndim == 2 else positions[:, 0]) < 0).sum(-1).cpu()
            self.filler = count if bool(count.any()) else None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens after the kept ones; returns all stored keys and values."""
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Tokens the model has seen (not the number stored)."""
        return self.seen

    def get_mask_sizes(self, query_length: "int | torch.Tensor") -> tuple[int, int]:
        """(kv_length, kv_offset) for the mask: stored + new tokens, placed at the end of the seen ones.

        Stored is the widest compressed layer of the cache (PyramidKV gives layers different budgets);
        narrower layers use the last columns of the same mask (chunkkv.patching trims it per layer).
        transformers 4.x passes the new tokens' cache_position tensor instead of their count."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        stored = max(p.keys.shape[-2] for p in self.peers)
        return stored + query_length, self.seen - stored

    @property
    def stored_length(self) -> int:
        """Tokens physically held."""
        return int(self.keys.shape[-2])

    def positions(self) -> torch.Tensor:
        """Absolute positions of every stored token: the kept ones, then those appended since."""
        appended = self.seen - self._seen_at_compression
        if appended == 0:
            return self._kept_positions
        tail = torch.arange(self._seen_at_compression, self.seen, device=self._kept_positions.device)
        tail = tail.expand(*self._kept_positions.shape[:-1], appended)
        return torch.cat([self._kept_positions, tail], dim=-1)

    def crop(self, max_length: int) -> None:
        """Cut the cache back to `max_length` tokens seen (negative: remove that many): only tokens
        appended after compression can go; a rollback into the compressed prompt is refused."""
        if max_length < 0:
            max_length = self.seen - abs(max_length)
        if max_length >= self.seen:
            return
        if max_length < self._seen_at_compression:
            raise ValueError(
                f"chunkkv: cannot roll the compressed cache back to {max_length} tokens: its prompt was compressed "
                f"at {self._seen_at_compression} tokens and the dropped tokens are gone (assisted or speculative "
                "decoding rolls back); unpatch the model (chunkkv.unpatch) for those generation modes")
        drop = self.seen - max_length
        self.keys, self.values = self.keys[..., :-drop, :], self.values[..., :-drop, :]
        self.seen = max_length

    def reset(self) -> None:
        super().reset()
        self.seen = self._seen_at_compression = 0
        self.filler = None

    def _batch_apply(self, fn) -> None:
        self.keys, self.values = fn(self.keys), fn(self.values)
        self._kept_positions = fn(self._kept_positions)
        if self.filler is not None:
            self.filler = fn(self.filler)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_apply(lambda t: t[indices, ...])


def layer_positions(layer: DynamicLayer) -> Optional[torch.Tensor]:
    """Absolute positions of the tokens a cache layer holds ([B, n] or [B, Hkv, n]); None if empty."""
    if isinstance(layer, CompressedLayer):
        return layer.positions()
    if getattr(layer, "keys", None) is None or layer.keys.ndim != 4 or layer.keys.numel() == 0:
        return None
    B, L = layer.keys.shape[0], layer.keys.shape[-2]
    start = layer.get_seq_length() - L  # 0 for a plain full-attention layer
    return (torch.arange(L, device=layer.keys.device) + start).expand(B, L)
