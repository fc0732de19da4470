"""Every bad input raises ValueError or TypeError (BufferError for DLPack ownership problems) with a
message naming the argument; nothing is written when a call fails."""
from __future__ import annotations

import numpy as np
import pytest

import chunkkv
from conftest import need_torch

try:
    import torch
except ImportError:
    torch = None

B, HQ, HKV, W, L, D = 2, 4, 2, 3, 20, 8


def f32(*shape, fill=0.5):
    return np.full(shape, fill, dtype=np.float32)


Q, K, V = f32(B, HQ, W, D), f32(B, HKV, L, D), f32(B, HKV, L, D)
IDX = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.int64)


def sel(q=Q, k=K, **kw):
    kw.setdefault("budget", 8)
    return lambda: chunkkv.select(q, k, **kw)


def scr(q=Q, k=K, **kw):
    return lambda: chunkkv.score(q, k, **kw)


def gat(k=K, v=V, idx=IDX, **kw):
    return lambda: chunkkv.gather(k, v, idx, **kw)


S = np.full((B, L - W), 0.5, np.float32)


def sfs(s=S, **kw):
    kw.setdefault("budget", 8)
    kw.setdefault("length", L)
    return lambda: chunkkv.select_from_scores(s, **kw)


def with_value(a, index, value):
    a = a.copy()
    a[index] = value
    return a


# (id, call, exception, regex the message must contain)
CASES = [
    # ranks and sizes
    ("queries-rank-3", sel(q=f32(B, HQ, W)), ValueError, "queries"),
    ("keys-rank-5", sel(k=f32(B, HKV, L, D, 1)), ValueError, "keys"),
    ("score-queries-rank", scr(q=f32(HQ, W, D)), ValueError, "queries"),
    ("batch-mismatch", sel(q=f32(B + 1, HQ, W, D)), ValueError, "batch"),
    ("head-dim-mismatch", sel(q=f32(B, HQ, W, D + 1)), ValueError, "head dim"),
    ("score-head-dim-mismatch", scr(k=f32(B, HKV, L, D * 2)), ValueError, "head dim"),
    ("hq-not-multiple", sel(q=f32(B, 3, W, D)), ValueError, "query heads"),
    ("hq-smaller-than-hkv", sel(q=f32(B, 1, W, D)), ValueError, "query heads"),
    ("no-kv-heads", sel(k=f32(B, 0, L, D)), ValueError, "key heads"),
    ("head-dim-zero", sel(q=f32(B, HQ, W, 0), k=f32(B, HKV, L, 0)), ValueError, "head dim"),
    ("window-longer-than-cache", sel(q=f32(B, HQ, L + 1, D), budget=L + 1), ValueError, "window"),
    ("score-window-longer-than-cache", scr(q=f32(B, HQ, L + 1, D)), ValueError, "window"),
    ("window-empty", sel(q=f32(B, HQ, 0, D)), ValueError, "window"),
    # scalar arguments
    ("budget-below-window", sel(budget=W - 1), ValueError, "budget"),
    ("budget-negative", sel(budget=-1), ValueError, "budget"),
    ("budget-float", sel(budget=8.0), TypeError, "budget"),
    ("budget-bool", sel(budget=True), TypeError, "budget"),
    ("budget-str", sel(budget="8"), TypeError, "budget"),
    ("budget-too-big", sel(budget=2**64), ValueError, "budget"),
    ("chunk-zero", sel(chunk_size=0), ValueError, "chunk_size"),
    ("chunk-negative", sel(chunk_size=-3), ValueError, "chunk_size"),
    ("chunk-float", sel(chunk_size=2.5), TypeError, "chunk_size"),
    ("method-unknown", sel(method="no-such-method"), ValueError, "method"),
    ("method-case", sel(method="ChunkKV"), ValueError, "method"),
    ("pool-unknown", sel(method="snapkv", pool="mean"), ValueError, "pool"),
    ("pool-kernel-even", sel(method="snapkv", pool_kernel=4), ValueError, "pool.kernel"),
    ("pool-kernel-zero", sel(method="snapkv", pool_kernel=0), ValueError, "pool.kernel"),
    ("pool-kernel-float", sel(method="snapkv", pool_kernel=3.0), TypeError, "pool_kernel"),
    ("n-sink-negative", sel(method="streamingllm", n_sink=-1), ValueError, "n_sink"),
    ("seed-negative", sel(method="random", seed=-1), ValueError, "seed"),
    ("seed-float", sel(method="random", seed=1.5), TypeError, "seed"),
    ("per-head-int", sel(per_head=1), TypeError, "per_head"),
    ("scale-zero", sel(scale=0.0), ValueError, "scale"),
    ("scale-nan", sel(scale=float("nan")), ValueError, "scale"),
    ("scale-inf", scr(scale=float("inf")), ValueError, "scale"),
    ("scale-str", scr(scale="0.1"), TypeError, "scale"),
    ("scale-underflows-float32", sel(scale=1e-60), ValueError, "scale"),
    ("scale-overflows-float32", scr(scale=1e60), ValueError, "scale"),
    ("row-starts-length", sel(row_starts=[0]), ValueError, "row_starts"),
    ("row-starts-range", sel(row_starts=[0, L + 1]), ValueError, "row_starts"),
    ("row-starts-negative", scr(row_starts=[-1, 0]), ValueError, "row_starts"),
    ("row-starts-type", sel(row_starts=3), TypeError, "row_starts"),
    ("row-starts-float", sel(row_starts=[0.5, 1]), TypeError, "row_starts"),
    # types and dtypes
    ("queries-list", sel(q=Q.tolist()), TypeError, "queries"),
    ("keys-none", sel(k=None), TypeError, "keys"),
    ("score-keys-scalar", scr(k=3.0), TypeError, "keys"),
    ("queries-int32", sel(q=Q.astype(np.int32)), TypeError, "queries"),
    ("keys-float64", sel(k=K.astype(np.float64)), TypeError, "keys"),
    ("keys-int64", sel(k=K.astype(np.int64)), TypeError, "keys"),
    ("keys-bool", scr(k=K.astype(bool)), TypeError, "keys"),
    ("queries-complex", scr(q=Q.astype(np.complex64)), TypeError, "queries"),
    ("score-queries-float64", scr(q=Q.astype(np.float64)), TypeError, "queries"),
    # non-finite inputs: the token scores are not finite
    ("nan-query", sel(q=with_value(Q, (1, 2, 0, 3), np.nan)), ValueError, "not finite"),
    ("inf-query", sel(q=with_value(Q, (0, 0, 2, 0), np.inf)), ValueError, "not finite"),
    ("nan-key", sel(k=with_value(K, (0, 1, 4, 0), np.nan)), ValueError, "not finite"),
    ("neg-inf-key", sel(k=with_value(K, (1, 0, 0, 7), -np.inf)), ValueError, "not finite"),
    ("nan-key-in-window", sel(k=with_value(K, (0, 0, L - 1, 0), np.nan)), ValueError, "not finite"),
    ("nan-key-per-head", sel(k=with_value(K, (1, 1, 3, 3), np.nan), per_head=True), ValueError, "not finite"),
    ("nan-key-snapkv", sel(k=with_value(K, (0, 0, 0, 0), np.nan), method="snapkv"), ValueError, "not finite"),
    ("inf-key-float16", sel(k=with_value(K, (0, 0, 5, 5), np.inf).astype(np.float16)), ValueError, "not finite"),
    ("nan-query-float16", sel(q=with_value(Q, (0, 3, 1, 1), np.nan).astype(np.float16)), ValueError,
     "not finite"),
    # select_from_scores
    ("sfs-method-streamingllm", sfs(method="streamingllm"), ValueError, "method"),
    ("sfs-method-random", sfs(method="random"), ValueError, "method"),
    ("sfs-method-kvpress", sfs(method="chunkkv-kvpress"), ValueError, "method"),
    ("sfs-method-unknown", sfs(method="nope"), ValueError, "method"),
    ("sfs-scores-rank-1", sfs(s=S[0]), ValueError, "scores"),
    ("sfs-scores-rank-4", sfs(s=S[None, None]), ValueError, "scores"),
    ("sfs-scores-float64", sfs(s=S.astype(np.float64)), TypeError, "scores"),
    ("sfs-scores-float16", sfs(s=S.astype(np.float16)), TypeError, "scores"),
    ("sfs-scores-list", sfs(s=S.tolist()), TypeError, "scores"),
    ("sfs-length-below-prefix", sfs(length=L - W - 1), ValueError, "L = "),
    ("sfs-length-negative", sfs(length=-1), ValueError, "length"),
    ("sfs-length-float", sfs(length=20.0), TypeError, "length"),
    ("sfs-budget-below-window", sfs(budget=W - 1), ValueError, "budget"),
    ("sfs-budget-float", sfs(budget=8.0), TypeError, "budget"),
    ("sfs-chunk-zero", sfs(chunk_size=0), ValueError, "chunk_size"),
    ("sfs-pool-kernel-even", sfs(method="snapkv", pool_kernel=2), ValueError, "pool.kernel"),
    ("sfs-pool-unknown", sfs(method="snapkv", pool="mean"), ValueError, "pool"),
    ("sfs-row-starts-range", sfs(row_starts=[0, L + 1]), ValueError, "row_starts"),
    ("sfs-row-starts-length", sfs(row_starts=[0]), ValueError, "row_starts"),
    ("sfs-nan", sfs(s=with_value(S, (1, 3), np.nan)), ValueError, "not finite"),
    ("sfs-inf-per-head", sfs(s=with_value(np.zeros((B, HKV, L - W), np.float32), (0, 1, 0), -np.inf)), ValueError,
     "not finite"),
    # gather
    ("gather-keys-rank", gat(k=f32(B, HKV, L)), ValueError, "keys"),
    ("gather-values-shape", gat(v=f32(B, HKV + 1, L, D)), ValueError, "values"),
    ("gather-values-length", gat(v=f32(B, HKV, L - 1, D)), ValueError, "values"),
    ("gather-keys-list", gat(k=K.tolist()), TypeError, "keys"),
    ("gather-values-none", gat(v=None), TypeError, "values"),
    ("gather-indices-list", gat(idx=IDX.tolist()), TypeError, "indices"),
    ("gather-keys-float64", gat(k=K.astype(np.float64)), TypeError, "keys"),
    ("gather-values-int32", gat(v=V.astype(np.int32)), TypeError, "values"),
    ("gather-indices-int32", gat(idx=IDX.astype(np.int32)), TypeError, "indices"),
    ("gather-indices-float", gat(idx=IDX.astype(np.float32)), TypeError, "indices"),
    ("gather-indices-rank-1", gat(idx=IDX[0]), ValueError, "indices"),
    ("gather-indices-rank-4", gat(idx=IDX[None, None]), ValueError, "indices"),
    ("gather-indices-batch", gat(idx=IDX[:1]), ValueError, "indices"),
    ("gather-indices-heads", gat(idx=np.zeros((B, HKV + 1, 3), np.int64)), ValueError, "indices"),
    ("gather-index-negative", gat(idx=with_value(IDX, (1, 2), -1)), ValueError, "indices"),
    ("gather-index-L", gat(idx=with_value(IDX, (0, 0), L)), ValueError, "indices"),
    ("gather-index-huge", gat(idx=with_value(IDX, (0, 1), 2**40)), ValueError, "indices"),
    ("gather-index-per-head", gat(idx=with_value(np.zeros((B, HKV, 2), np.int64), (1, 1, 1), L)), ValueError,
     "indices"),
    ("gather-out-not-pair", gat(out=f32(B, HKV, 3, D)), TypeError, "out"),
    ("gather-out-triple", gat(out=(f32(B, HKV, 3, D),) * 3), TypeError, "out"),
    ("gather-out-shape", gat(out=(f32(B, HKV, 4, D), f32(B, HKV, 3, D))), ValueError, "keys_out"),
    ("gather-out-dtype", gat(out=(f32(B, HKV, 3, D), f32(B, HKV, 3, D).astype(np.float16))), TypeError,
     "values_out"),
    ("gather-out-list", gat(out=([0.0], f32(B, HKV, 3, D))), TypeError, "keys_out"),
    ("compact-not-increasing", lambda: chunkkv.compact_(K.copy(), V.copy(), IDX[:, ::-1]), ValueError, "increasing"),
    ("compact-keys-list", lambda: chunkkv.compact_(K.tolist(), V.copy(), IDX), TypeError, "keys"),
    ("compact-indices-rank", lambda: chunkkv.compact_(K.copy(), V.copy(), IDX[0]), ValueError, "indices"),
    ("compress-budget", lambda: chunkkv.compress(Q, K, V, budget=1), ValueError, "budget"),
    ("set-num-threads-str", lambda: chunkkv.set_num_threads("2"), TypeError, "n"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_no_nan_error_when_nothing_is_scored():
    """Methods that do not score, and budgets that keep everything, never look at the values."""
    k = with_value(K, (0, 0, 0, 0), np.nan)
    assert chunkkv.select(Q, k, budget=L).shape == (B, L)
    assert chunkkv.select(Q, k, budget=8, method="streamingllm").shape == (B, 8)
    assert chunkkv.select(Q, k, budget=8, method="random").shape == (B, 8)


def test_shared_outputs_are_refused():
    out = f32(B, HKV, 3, D, fill=7.0)
    with pytest.raises(ValueError, match="share"):
        chunkkv.gather(K, V, IDX, out=(out, out))
    assert (out == 7.0).all()


def test_failed_gather_writes_nothing():
    ok, ov = f32(B, HKV, 3, D, fill=7.0), f32(B, HKV, 3, D, fill=7.0)
    with pytest.raises(ValueError, match="indices"):
        chunkkv.gather(K, V, with_value(IDX, (1, 2), L), out=(ok, ov))
    assert (ok == 7.0).all() and (ov == 7.0).all()


def test_torch_errors():
    need_torch()
    tq, tk, tv = (torch.from_numpy(x) for x in (Q, K, V))
    with pytest.raises(TypeError, match="keys"):
        chunkkv.select(tq, tk.double(), budget=8)
    with pytest.raises(TypeError, match="queries"):
        chunkkv.score(tq.int(), tk)
    with pytest.raises(TypeError, match="indices"):
        chunkkv.gather(tk, tv, torch.from_numpy(IDX).int())
    with pytest.raises(ValueError, match="not finite"):
        chunkkv.select(tq, tk.bfloat16().index_fill(2, torch.tensor([3]), float("nan")), budget=8)
    out = torch.zeros(B, HKV, 1, D).expand(B, HKV, 3, D)  # zero stride: rows would overwrite each other
    with pytest.raises(ValueError, match="keys_out"):
        chunkkv.gather(tk, tv, torch.from_numpy(IDX), out=(out, torch.zeros(B, HKV, 3, D)))
    with pytest.raises(TypeError, match="values_out"):
        chunkkv.gather(tk, tv, torch.from_numpy(IDX), out=(torch.zeros(B, HKV, 3, D),
                                                            torch.zeros(B, HKV, 3, D, dtype=torch.float16)))


def test_select_from_scores_core_refuses_strided_scores():
    """The core reads given scores as rows of P floats: a strided view is a layout error there
    (chunkkv.select_from_scores passes a contiguous copy), and nothing is written."""
    from chunkkv import _C

    wide = np.zeros((B, 2 * (L - W)), np.float32)
    out = np.full((B, 8), -7, np.int64)
    with pytest.raises(ValueError, match="scores must be C-contiguous"):
        _C.select_from_scores(wide[:, ::2].__dlpack__(), out.__dlpack__(), L, method=0, budget=8)
    assert (out == -7).all()
    with pytest.raises(ValueError, match="indices must have shape"):
        _C.select_from_scores(S.__dlpack__(), np.zeros((B, 9), np.int64).__dlpack__(), L, method=0, budget=8)
