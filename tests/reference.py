"""A plain NumPy reference of chunkkv's core ops, written from the spec (not from the C code).

    score(q, k)            float64 token scores per KV head, [B, Hkv, P]
    select(q, k, ...)      kept positions, [B, n] or [B, Hkv, n], for all four methods
    select_from_scores(s, L, ...)  the same selection from given token scores [B, P] or [B, Hkv, P]
    gather(k, v, idx)      the kept rows, [B, Hkv, n, D]

Inputs are anything np.asarray takes (NumPy arrays; torch tensors go through to_f64 first).
select() takes optional precomputed per-head token scores: given chunkkv.score's own float32
scores it repeats the C core's arithmetic exactly (heads summed in float32 in head order, chunk
sums in float64 from the first token on, avg pooling in float32), so selection logic can be
compared bit for bit; without them it scores in float64.

first_divergence() explains a difference between two selections of one row as a near-tie.
"""
from __future__ import annotations

import numpy as np

METHODS = ("chunkkv", "snapkv", "streamingllm", "random")


def to_f64(x) -> np.ndarray:
    """A float64 NumPy copy of a NumPy array or torch tensor (half types upcast exactly)."""
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return x.detach().to(torch.float64).cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- score


def score(q, k, scale=None, row_starts=None) -> np.ndarray:
    """s[b, g, j] = sum over the query heads h of KV head g and window queries i of
    softmax_j(scale * q[b,h,i] . k[b,g,j]) over the keys j <= P + i, for j < P = L - w.

    With row_starts, keys j < row_starts[b] are masked out and a window query that sees no key
    of its row adds nothing."""
    q, k = to_f64(q), to_f64(k)
    B, Hq, w, D = q.shape
    _, Hkv, L, _ = k.shape
    G, P = Hq // Hkv, L - w
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    out = np.zeros((B, Hkv, P))
    if P == 0 or B == 0:
        return out
    qg = q.reshape(B, Hkv, G * w, D)                                 # query head g*G + h, row h*w + i
    logits = (scale * (qg @ k.swapaxes(-1, -2))).reshape(B, Hkv, G, w, L)
    j = np.arange(L)
    causal = j[None, :] <= (P + np.arange(w))[:, None]               # [w, L]: query i sees keys j <= P + i
    starts = np.zeros(B, dtype=np.int64) if row_starts is None else np.asarray(row_starts, dtype=np.int64)
    for b in range(B):
        visible = causal & (j[None, :] >= starts[b])                 # [w, L]
        lg = logits[b] + np.where(visible, 0.0, -np.inf)             # [Hkv, G, w, L]
        mx = lg.max(axis=-1, keepdims=True)
        lg -= np.where(np.isfinite(mx), mx, 0.0)                     # a query that sees no key stays -inf
        np.exp(lg, out=lg)                                           # masked keys: exp(-inf) = 0
        den = lg.sum(axis=-1)                                        # [Hkv, G, w]
        inv = np.divide(1.0, den, out=np.zeros_like(den), where=den > 0).reshape(Hkv, 1, G * w)
        out[b] = (inv @ lg[..., :P].reshape(Hkv, G * w, P))[:, 0]    # sum over query rows of p[..., :P]
    return out


def sum_heads(s: np.ndarray) -> np.ndarray:
    """[B, Hkv, P] -> [B, P], adding heads one by one in head order, in s's own dtype."""
    acc = s[:, 0].copy()
    for g in range(1, s.shape[1]):
        acc = acc + s[:, g]
    return acc


# ----------------------------------------------------------------------------- selection of one row


def _chunk_sums(s: np.ndarray, c: int) -> np.ndarray:
    """Chunk m = [m*c, min((m+1)*c, P)); float64 sums added left to right (np.cumsum is sequential)."""
    P = len(s)
    nch = -(-P // c)
    padded = np.zeros(nch * c)
    padded[:P] = s
    return np.cumsum(padded.reshape(nch, c), axis=1)[:, -1]


def _rank(values: np.ndarray) -> np.ndarray:
    """Positions ordered by value descending, ties to the lower position."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values, dtype=np.float64)))


def chunkkv_walk(s: np.ndarray, Bp: int, c: int):
    """The chunk walk: a list of (chunk, [tokens taken]) in visiting order."""
    P = len(s)
    c = min(c, P)
    steps, left = [], Bp
    for m in _rank(_chunk_sums(s, c)):
        if left <= 0:
            break
        lo, hi = m * c, min(m * c + c, P)
        if hi - lo <= left:
            steps.append((int(m), list(range(lo, hi))))
            left -= hi - lo
        else:
            best = lo + _rank(s[lo:hi])[:left]
            steps.append((int(m), sorted(int(t) for t in best)))
            break
    return steps


def pooled(s: np.ndarray, kernel: int, use_max: bool) -> np.ndarray:
    """SnapKV pooling over [j - kernel//2, j + kernel//2] clipped to [0, P), in s's dtype.

    avg: the sum of the neighbours inside [0, P), added left to right, divided by kernel (the
    zero padding counts); max: the largest neighbour inside [0, P)."""
    P, half = len(s), min(kernel // 2, len(s))
    if use_max:
        acc = np.full(P, -np.inf, dtype=s.dtype)
        pad = np.full(P + 2 * half, -np.inf, dtype=s.dtype)
    else:
        acc = np.zeros(P, dtype=s.dtype)
        pad = np.zeros(P + 2 * half, dtype=s.dtype)
    pad[half:half + P] = s
    for o in range(2 * half + 1):  # neighbours j - half ... j + half, in that order (+0 is exact)
        acc = np.maximum(acc, pad[o:o + P]) if use_max else acc + pad[o:o + P]
    return acc if use_max else acc / s.dtype.type(kernel)


_M64 = (1 << 64) - 1
_ROW_SEED_STEP = 0x632BE59BD9B4E019


def splitmix64(state: int):
    """One splitmix64 step: (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def random_prefix(P: int, Bp: int, seed: int) -> list:
    """Bp distinct prefix positions: a partial Fisher-Yates shuffle driven by splitmix64."""
    perm, state = list(range(P)), seed & _M64
    for j in range(Bp):
        state, z = splitmix64(state)
        pick = j + z % (P - j)
        perm[j], perm[pick] = perm[pick], perm[j]
    return perm[:Bp]


def select_row(s, L: int, w: int, budget: int, *, method="chunkkv", chunk_size=10, pool_kernel=1,
               pool="avg", n_sink=4, seed=0) -> np.ndarray:
    """The sorted positions one row keeps; s holds the row's P = L - w token scores (None for
    methods that do not score)."""
    if budget >= L:
        return np.arange(L)
    P, Bp = L - w, budget - w
    keep = set(range(P, L))
    if method == "chunkkv":
        for _, toks in chunkkv_walk(np.asarray(s), Bp, chunk_size):
            keep.update(toks)
    elif method == "snapkv":
        keep.update(int(t) for t in _rank(pooled(np.asarray(s), pool_kernel, pool == "max"))[:Bp])
    elif method == "h2o":  # heavy hitters: the best raw scores, no pooling
        keep.update(int(t) for t in _rank(np.asarray(s))[:Bp])
    elif method == "streamingllm":
        sinks = min(n_sink, Bp)
        keep.update(range(sinks))
        keep.update(range(L - (budget - sinks), L))
    elif method == "random":
        keep.update(random_prefix(P, Bp, seed))
    else:
        raise ValueError(method)
    out = np.array(sorted(keep), dtype=np.int64)
    assert len(out) == budget
    return out


# ----------------------------------------------------------------------------- select / gather


def row_scores(q, k, *, scale=None, per_head=False, token_scores=None, row_starts=None) -> np.ndarray:
    """The scores selection ranks: [B, P] (heads summed) or [B * Hkv, P] (per_head)."""
    s = score(q, k, scale, row_starts) if token_scores is None else np.asarray(token_scores)
    return s.reshape(s.shape[0] * s.shape[1], s.shape[2]) if per_head else sum_heads(s)


def select(q, k, *, budget, chunk_size=10, scale=None, per_head=False, method="chunkkv", pool_kernel=1,
           pool="avg", n_sink=4, seed=0, token_scores=None, row_starts=None) -> np.ndarray:
    """Kept positions [B, n] (or [B, Hkv, n] with per_head), n = min(budget, L).

    token_scores: per-head scores [B, Hkv, P] to rank instead of the float64 reference scores
    (e.g. chunkkv.score's float32 output, whose dtype the head sum and pooling then keep).
    row_starts: row b's tokens are [row_starts[b], L); a row with no more than budget tokens
    keeps the last n positions."""
    B, _, w, _ = np.shape(q)
    _, Hkv, L, _ = np.shape(k)
    if budget < w:
        raise ValueError("budget < w")
    needs = method in ("chunkkv", "snapkv") and budget < L
    S = row_scores(q, k, scale=scale, per_head=per_head, token_scores=token_scores,
                   row_starts=row_starts) if needs else None
    out = _select_rows(S, B, Hkv if per_head else 1, L, w, budget, row_starts, method=method,
                       chunk_size=chunk_size, pool_kernel=pool_kernel, pool=pool, n_sink=n_sink, seed=seed)
    return out.reshape(B, Hkv, min(budget, L)) if per_head else out


def _select_rows(S, B: int, H: int, L: int, w: int, budget: int, row_starts, **method_args) -> np.ndarray:
    """Selection of each of the B * H rows of S ([B * H, L - w] or None), row r starting at
    row_starts[r // H]: [B * H, n]."""
    n, seed = min(budget, L), method_args.pop("seed", 0)
    out = np.empty((B * H, n), dtype=np.int64)
    for r in range(B * H):
        start = 0 if row_starts is None else int(row_starts[r // H])
        if budget >= L - start:
            out[r] = np.arange(L - n, L)
            continue
        sr = None if S is None else S[r][start:]
        out[r] = start + select_row(sr, L - start, w, budget, seed=(seed + _ROW_SEED_STEP * r) & _M64, **method_args)
    return out


def select_from_scores(scores, L: int, *, budget, chunk_size=10, method="chunkkv", pool_kernel=1, pool="avg",
                       row_starts=None) -> np.ndarray:
    """select()'s positions from given token scores: [B, P] -> [B, n], [B, Hkv, P] -> [B, Hkv, n]
    (one selection per head), n = min(budget, L); the window is [P, L). Methods chunkkv, snapkv,
    h2o; the scores' dtype is kept (float32 scores give the C core's arithmetic)."""
    s = np.asarray(scores)
    per_head = s.ndim == 3
    B, H, P = (s.shape if per_head else (s.shape[0], 1, s.shape[1]))
    if method not in ("chunkkv", "snapkv", "h2o") or budget < L - P:
        raise ValueError((method, budget, L, P))
    out = _select_rows(s.reshape(B * H, P), B, H, L, L - P, budget, row_starts, method=method,
                       chunk_size=chunk_size, pool_kernel=pool_kernel, pool=pool)
    return out.reshape(B, H, min(budget, L)) if per_head else out


def gather(keys, values, indices):
    """(keys[b, g, idx[b, (g,) t]], values[...]) as [B, Hkv, n, D], in the inputs' dtype."""
    keys, values, idx = np.asarray(keys), np.asarray(values), np.asarray(indices)
    B, H = keys.shape[:2]
    if idx.ndim == 2:
        idx = np.broadcast_to(idx[:, None, :], (B, H, idx.shape[-1]))
    take = idx[..., None]
    return np.take_along_axis(keys, take, axis=2), np.take_along_axis(values, take, axis=2)


# ----------------------------------------------------------------------------- explaining differences


def _rel_gap(a: float, b: float) -> float:
    a, b = float(a), float(b)
    m = max(abs(a), abs(b))
    return 0.0 if m == 0.0 else abs(a - b) / m


def _top_boundary_gap(values: np.ndarray, got: set, want: set, k: int) -> float:
    """How far from the k-th best value the positions where two top-k sets differ lie (relative)."""
    kth = np.sort(np.asarray(values, dtype=np.float64))[::-1][k - 1]
    return max(_rel_gap(values[t], kth) for t in got ^ want)


def first_divergence(s_ref: np.ndarray, s_alt: np.ndarray, L: int, w: int, budget: int, *, method="chunkkv",
                     chunk_size=10, pool_kernel=1, pool="avg"):
    """Why selecting with s_alt instead of s_ref changed a row: the relative gap, in s_ref, between
    the two candidates that the two selections ranked the other way round at their first difference
    (0.0 for an exact tie), or None when both select the same positions.

    chunkkv: both walks visit chunks in lockstep (the budget left is the same until they differ);
    at the first step that differs either two chunks compete (their chunk sums) or the same chunk is
    cut differently (its tokens around the cut). snapkv: the pooled scores around the Bp-th best."""
    if budget >= L:
        return None
    P, Bp = L - w, budget - w
    s_ref, s_alt = np.asarray(s_ref, dtype=np.float64), np.asarray(s_alt)
    if method == "snapkv":
        pr = pooled(s_ref, pool_kernel, pool == "max")
        pa = pooled(s_alt, pool_kernel, pool == "max")
        got, want = set(_rank(pa)[:Bp].tolist()), set(_rank(pr)[:Bp].tolist())
        return None if got == want else _top_boundary_gap(pr, got, want, Bp)
    if method != "chunkkv":
        raise ValueError(f"{method} does not rank scores")
    c = min(chunk_size, P)
    sums = _chunk_sums(s_ref, c)
    walk_ref, walk_alt = chunkkv_walk(s_ref, Bp, c), chunkkv_walk(s_alt, Bp, c)
    for (m_ref, t_ref), (m_alt, t_alt) in zip(walk_ref, walk_alt):
        if m_ref != m_alt:
            return _rel_gap(sums[m_ref], sums[m_alt])
        if t_ref != t_alt:  # the same chunk, cut to other tokens
            lo = m_ref * c
            seg = s_ref[lo:min(lo + c, P)]
            rebased = lambda ts: {t - lo for t in ts}  # noqa: E731
            return _top_boundary_gap(seg, rebased(t_alt), rebased(t_ref), len(t_ref))
    return None
