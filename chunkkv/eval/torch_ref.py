"""ChunkKV (paper mode) as well-vectorised PyTorch: the baseline the C core is timed against.

No Python loops over tokens or chunks: scores by one batched matmul per KV head group, chunk sums by
a reshape, the best-first walk by a cumulative sum over the sorted chunk sizes.
"""
from __future__ import annotations

import torch


def select(q: torch.Tensor, k: torch.Tensor, budget: int, chunk_size: int = 10) -> torch.Tensor:
    """Kept positions [B, n] for queries [B, Hq, w, D] and keys [B, Hkv, L, D] (the paper's rule)."""
    B, Hq, w, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P, c = Hq // Hkv, L - w, chunk_size
    if budget >= L:
        return torch.arange(L, device=k.device).expand(B, L)
    qg = q.reshape(B, Hkv, G * w, D).float()
    logits = torch.matmul(qg, k.float().transpose(-1, -2)) * D ** -0.5             # [B, Hkv, G*w, L]
    i = torch.arange(w, device=k.device).repeat(G)
    visible = torch.arange(L, device=k.device)[None, :] <= (P + i)[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    s = probs[..., :P].sum(dim=(1, 2))                                                # [B, P]
    n_chunks = -(-P // c)
    padded = torch.nn.functional.pad(s, (0, n_chunks * c - P))
    chunk_scores = padded.view(B, n_chunks, c).double().sum(-1)
    sizes = torch.full((n_chunks,), c, device=k.device)
    sizes[-1] = P - (n_chunks - 1) * c
    # best first, ties to the lower chunk: a stable sort of the negated scores
    order = torch.sort(-chunk_scores, dim=-1, stable=True).indices                     # [B, n_chunks]
    Bp = budget - w
    before = torch.cumsum(sizes[order], -1) - sizes[order]                              # tokens taken before each
    whole = (before + sizes[order] <= Bp) & (torch.cumsum((before + sizes[order] > Bp).int(), -1) == 0)
    keep = torch.zeros(B, n_chunks * c, dtype=torch.bool, device=k.device)
    chunk_of = order.masked_fill(~whole, n_chunks)                                      # n_chunks: none
    tok = (chunk_of[..., None] * c + torch.arange(c, device=k.device)).clamp_max(n_chunks * c)
    keep = torch.nn.functional.pad(keep, (0, 1)).scatter(1, tok.view(B, -1), True)[:, : n_chunks * c]
    # the first chunk that does not fit is cut to its best tokens
    n_whole = whole.sum(-1)
    left = Bp - (sizes[order] * whole).sum(-1)
    cut = order.gather(1, n_whole.clamp_max(n_chunks - 1)[:, None])[:, 0]
    cut_tok = cut[:, None] * c + torch.arange(c, device=k.device)
    cut_scores = padded.gather(1, cut_tok.clamp_max(n_chunks * c - 1)).masked_fill(cut_tok >= P, float("-inf"))
    rank = torch.sort(-cut_scores, dim=-1, stable=True).indices
    take = torch.arange(c, device=k.device)[None, :] < left[:, None]
    chosen = cut_tok.gather(1, rank).masked_fill(~take, n_chunks * c)
    keep = torch.nn.functional.pad(keep, (0, 1)).scatter(1, chosen, True)[:, :P]
    keep = torch.cat([keep, torch.ones(B, w, dtype=torch.bool, device=k.device)], -1)
    return keep.nonzero()[:, 1].view(B, budget)


def compress(q, k, v, budget: int, chunk_size: int = 10):
    idx = select(q, k, budget, chunk_size)
    g = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, g), v.gather(2, g), idx
