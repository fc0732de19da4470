"""Choosing the kept positions of one request from its in-flight prompt queries and keys.

One process: ``chunkkv.select`` in the C core, the same call ``chunkkv.patch`` makes. Tensor parallel: each
rank holds some KV heads, so the per-head token scores (``chunkkv.score``, C core) are gathered from every
rank in head order, summed over heads exactly as the core sums them, and ``chunkkv.select_from_scores`` (C core)
walks the chunks.
Every rank then keeps the positions a single process would keep.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import ops
from .config import ChunkKVConfig


def select_positions(config: ChunkKVConfig, queries: torch.Tensor, keys: torch.Tensor, kept: int, scale: float,
                     gather_heads: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Kept positions (int64 [kept], sorted) of one request.

    queries ``[w, Hq, D]`` (the last w prompt queries, rotated), keys ``[L, Hkv, D]`` (the whole prompt):
    views of vLLM's in-flight tensors, passed to the core without a copy. ``gather_heads`` (tensor parallel)
    concatenates a ``[Hkv_local, P]`` tensor over the ranks along dim 0, in rank order.
    """
    q = queries.permute(1, 0, 2).unsqueeze(0)  # [1, Hq, w, D]
    k = keys.permute(1, 0, 2).unsqueeze(0)     # [1, Hkv, L, D]
    length, window = keys.shape[0], queries.shape[0]
    if gather_heads is None or config.method != "chunkkv":
        # streamingllm/random do not score: every rank picks the same positions on its own
        args: dict[str, Any] = {"n_sink": config.n_sink} if config.method == "streamingllm" else {}
        if config.method == "random":
            args["seed"] = config.seed
        return ops.select(q, k, budget=kept, chunk_size=config.chunk_size, scale=scale, method=config.method,
                          **args)[0]
    local = ops.score(q, k, scale=scale)[0]          # [Hkv_local, P] float32
    per_head = gather_heads(local.contiguous())     # [Hkv, P], heads in global order
    summed = per_head[0].clone()
    for h in range(1, per_head.shape[0]):           # head by head in float32, as the core sums them
        summed += per_head[h]
    return ops.select_from_scores(summed[None], length=length, budget=kept, chunk_size=config.chunk_size)[0]
