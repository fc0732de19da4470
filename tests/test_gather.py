"""gather / compact_ / compress: exact equality with the reference, guarded out= buffers, in-place
compaction, and inputs left untouched."""
from __future__ import annotations

import numpy as np
import pytest

import chunkkv
import reference as ref
from conftest import DTYPES, LAYOUTS, bits, lib_for, make, make_indices, need_torch, to_numpy

try:
    import torch
except ImportError:
    torch = None

N_CASES = 300
OUT_LAYOUTS = ("contiguous", "bhld_T", "step", "fortran")  # writable layouts (no broadcast)


def random_sizes(rng):
    B, H = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3, 4, 8]))
    D = int(rng.choice([8, 16, 24, 64, 128]))
    u = rng.random()
    L = int(rng.integers(1, 30) if u < 0.4 else rng.integers(30, 400) if u < 0.85 else rng.integers(400, 3001))
    return B, H, L, D


def random_indices(rng, B, H, L, per_head, n, increasing):
    shape = (B, H) if per_head else (B,)
    if increasing:  # strictly increasing rows, as select returns them
        idx = np.stack([np.sort(rng.choice(L, size=n, replace=False)) for _ in range(int(np.prod(shape)))])
        return idx.reshape(shape + (n,))
    return rng.integers(0, L, size=shape + (n,))


def guarded_out(shape, dtype, lib, rng):
    """A view of exactly `shape` inside a bigger buffer filled with a sentinel; returns
    (view, buffer, mask of the view's elements inside the buffer)."""
    B, H, n, D = shape
    kind = rng.integers(0, 3)
    fill = -1234.0
    big_shape = (B + 2, H + 1, 2 * n + 3, D + 5) if kind != 2 else (B + 1, 2 * H, n + 2, 2 * D + 1)
    if lib == "torch":
        big = torch.full(big_shape, fill, dtype=getattr(torch, dtype))
    else:
        big = np.full(big_shape, fill, dtype=dtype)
    if kind == 0:
        sl = (slice(1, B + 1), slice(0, H), slice(2, 2 + n), slice(3, 3 + D))
    elif kind == 1:  # every other token
        sl = (slice(1, B + 1), slice(1, H + 1), slice(3, 3 + 2 * n, 2), slice(0, D))
    else:  # every other head and feature
        sl = (slice(0, B), slice(1, 2 * H, 2), slice(1, n + 1), slice(1, 2 * D + 1, 2))
    mask = np.zeros(big_shape, dtype=bool)
    mask[sl] = True
    view = big[sl]
    assert tuple(view.shape) == shape
    return view, big, mask


@pytest.mark.parametrize("case", range(N_CASES))
def test_gather_random(case, tally):
    rng = np.random.default_rng([303, case])
    B, H, L, D = random_sizes(rng)
    dtype = str(rng.choice(DTYPES))
    lib = lib_for(dtype, rng)
    k, k64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, str(rng.choice(LAYOUTS)))
    v, v64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, str(rng.choice(LAYOUTS)))
    per_head = bool(rng.random() < 0.5)
    n = int(rng.choice([1, L, int(rng.integers(1, L + 1)), L + int(rng.integers(1, 6))]))  # repeats allowed
    idx_np = random_indices(rng, B, H, L, per_head, n, increasing=False)
    idx = make_indices(idx_np, lib, str(rng.choice(["contiguous", "step", "transposed"])))
    want_k, want_v = ref.gather(k64, v64, idx_np)
    before = [bits(x) for x in (k, v, idx)]

    if rng.random() < 0.5:
        ok, ov = chunkkv.gather(k, v, idx)
        assert type(ok) is type(k) and tuple(ok.shape) == (B, H, n, D)
        assert str(ok.dtype).split(".")[-1] == dtype
    else:
        (ok, bk, mk), (ov, bv, mv) = (guarded_out((B, H, n, D), dtype, lib, rng) for _ in range(2))
        guard_k, guard_v = to_numpy(bk), to_numpy(bv)
        rk, rv = chunkkv.gather(k, v, idx, out=(ok, ov))
        assert rk is ok and rv is ov
        assert np.array_equal(to_numpy(bk)[~mk], guard_k[~mk]), "keys_out guard region was written"
        assert np.array_equal(to_numpy(bv)[~mv], guard_v[~mv]), "values_out guard region was written"
    assert np.array_equal(ref.to_f64(ok), want_k) and np.array_equal(ref.to_f64(ov), want_v)
    assert all(np.array_equal(bits(x), b) for x, b in zip((k, v, idx), before)), "inputs changed"
    tally["cases"]["gather"] += 1


@pytest.mark.parametrize("case", range(N_CASES // 2))
def test_compact_random(case, tally):
    """compact_ moves the kept rows to the front in place; rows past n stay as they were."""
    rng = np.random.default_rng([404, case])
    B, H, L, D = random_sizes(rng)
    dtype = str(rng.choice(DTYPES))
    lib = lib_for(dtype, rng)
    layout = str(rng.choice(["contiguous", "bhld_T", "step", "reversed", "fortran"]))
    k, k64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, layout)
    v, v64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, str(rng.choice(OUT_LAYOUTS)))
    per_head = bool(rng.random() < 0.5)
    n = int(rng.choice([1, L, int(rng.integers(1, L + 1))]))
    idx_np = random_indices(rng, B, H, L, per_head, n, increasing=True)
    idx = make_indices(idx_np, lib, str(rng.choice(["contiguous", "step", "transposed"])))
    want_k, want_v = ref.gather(k64, v64, idx_np)
    idx_bits = bits(idx)
    ck, cv = chunkkv.compact_(k, v, idx)
    assert np.array_equal(ref.to_f64(ck), want_k) and np.array_equal(ref.to_f64(cv), want_v)
    # the returned views are the fronts of the caches themselves
    assert np.array_equal(ref.to_f64(k)[:, :, :n], want_k) and np.array_equal(ref.to_f64(v)[:, :, :n], want_v)
    assert np.array_equal(ref.to_f64(k)[:, :, n:], k64[:, :, n:]), "rows past n changed"
    assert np.array_equal(ref.to_f64(v)[:, :, n:], v64[:, :, n:]), "rows past n changed"
    assert np.array_equal(bits(idx), idx_bits)
    tally["cases"]["compact_"] += 1


@pytest.mark.parametrize("case", range(60))
def test_compress_random(case, tally):
    rng = np.random.default_rng([505, case])
    B, H, L, D = random_sizes(rng)
    L = min(L, 600)
    w = int(rng.integers(1, min(L, 8) + 1))
    G = int(rng.choice([1, 2, 4]))
    dtype = str(rng.choice(DTYPES))
    lib = lib_for(dtype, rng)
    q, q64 = make(rng.standard_normal((B, H * G, w, D)), dtype, lib, str(rng.choice(LAYOUTS)))
    k, k64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, str(rng.choice(LAYOUTS)))
    v, v64 = make(rng.standard_normal((B, H, L, D)), dtype, lib, str(rng.choice(LAYOUTS)))
    budget = int(rng.integers(w, L + 3))
    args = dict(budget=budget, chunk_size=int(rng.integers(1, 12)), per_head=bool(rng.random() < 0.5))
    before = [bits(x) for x in (q, k, v)]
    kk, vv, idx = chunkkv.compress(q, k, v, **args)
    want_idx = ref.select(q64, k64, token_scores=to_numpy(chunkkv.score(q, k)), **args)
    assert np.array_equal(to_numpy(idx), want_idx)
    want_k, want_v = ref.gather(k64, v64, want_idx)
    assert np.array_equal(ref.to_f64(kk), want_k) and np.array_equal(ref.to_f64(vv), want_v)
    assert all(np.array_equal(bits(x), b) for x, b in zip((q, k, v), before)), "inputs changed"
    tally["cases"]["compress"] += 1


def test_compact_after_select_pipeline():
    """select then compact_ on the same cache: what compress returns, without a copy of the cache."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 8, 4, 32)).astype(np.float32)
    k = rng.standard_normal((2, 4, 256, 32)).astype(np.float32)
    v = rng.standard_normal((2, 4, 256, 32)).astype(np.float32)
    for per_head in (False, True):
        kk, vv, idx = chunkkv.compress(q, k, v, budget=64, chunk_size=8, per_head=per_head)
        k2, v2 = k.copy(), v.copy()
        ck, cv = chunkkv.compact_(k2, v2, idx)
        assert np.shares_memory(ck, k2) and np.shares_memory(cv, v2)
        assert np.array_equal(ck, kk) and np.array_equal(cv, vv)


def test_compact_torch_in_place():
    need_torch()
    t = torch.arange(2 * 3 * 10 * 4, dtype=torch.float32).reshape(2, 3, 10, 4)
    u = -t.clone()
    idx = torch.tensor([[1, 4, 9], [0, 2, 3]])
    want_k, want_v = ref.gather(t.numpy().copy(), u.numpy().copy(), idx.numpy())
    ptr = t.data_ptr()
    ck, cv = chunkkv.compact_(t, u, idx)
    assert ck.data_ptr() == ptr and ck.shape == (2, 3, 3, 4)
    assert np.array_equal(ck.numpy(), want_k) and np.array_equal(cv.numpy(), want_v)


@pytest.mark.parametrize("bad", [[[3, 1, 5]], [[1, 1, 5]]])
def test_compact_needs_increasing_rows(bad):
    k = np.arange(1 * 2 * 8 * 4, dtype=np.float32).reshape(1, 2, 8, 4)
    v = k.copy()
    k0 = k.copy()
    with pytest.raises(ValueError, match="increasing"):
        chunkkv.compact_(k, v, np.array(bad, dtype=np.int64))
    assert np.array_equal(k, k0) and np.array_equal(v, k0), "nothing is written when the check fails"
    # out of place, repeats and any order are fine
    ok, _ = chunkkv.gather(k, v, np.array(bad, dtype=np.int64))
    assert np.array_equal(ok, ref.gather(k, v, np.array(bad))[0])


def test_gather_zero_rows_and_empty_batch():
    k = np.ones((0, 2, 5, 4), np.float32)
    ok, ov = chunkkv.gather(k, k.copy(), np.zeros((0, 3), np.int64))
    assert ok.shape == (0, 2, 3, 4)
    k = np.ones((1, 2, 5, 4), np.float32)
    ok, ov = chunkkv.gather(k, k.copy(), np.zeros((1, 0), np.int64))
    assert ok.shape == (1, 2, 0, 4)


def test_gather_keys_and_values_may_be_one_tensor():
    k = np.random.default_rng(0).standard_normal((1, 2, 9, 4)).astype(np.float32)
    idx = np.array([[8, 0, 4, 4]])
    ok, ov = chunkkv.gather(k, k, idx)
    assert np.array_equal(ok, ov) and np.array_equal(ok, ref.gather(k, k, idx)[0])


# ------------------------------------------------------------------ outputs overlapping inputs (issue 20)


def overlap_cases():
    """(name, keys, values, indices, keys_out, values_out, buffers): outputs that share memory with an
    input, or with each other, other than as the very same view. Each would be computed from data the
    call itself has already overwritten."""
    B, H, L, D, n = 2, 3, 12, 4, 5
    rng = np.random.default_rng(20)
    idx = np.stack([np.sort(rng.choice(L, size=n, replace=False)) for _ in range(B)]).astype(np.int64)
    idx[:, 0] = 0  # a row read from where a shifted output writes first
    cases = []

    buf = rng.standard_normal((B, H, L + 1, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    cases.append(("keys_out shifted one token after keys", buf[:, :, :L], v, idx, buf[:, :, 1:n + 1],
                  np.zeros((B, H, n, D), np.float32), [buf, v]))
    buf = rng.standard_normal((B, H, L + 1, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    cases.append(("keys_out shifted one token before keys", buf[:, :, 1:], v, idx, buf[:, :, :n],
                  np.zeros((B, H, n, D), np.float32), [buf, v]))
    buf = rng.standard_normal((B, H, L, D + 2)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    cases.append(("keys_out shifted along D", buf[..., :D], v, idx, buf[:, :, :n, 2:],
                  np.zeros((B, H, n, D), np.float32), [buf, v]))
    # keys_out lying over the end of values: gathering keys first overwrites values' last rows
    k = rng.standard_normal((B, H, L, D)).astype(np.float32)
    buf = rng.standard_normal((B, H, L + n, D)).astype(np.float32)
    cases.append(("keys_out over the end of values", k, buf[:, :, :L], idx, buf[:, :, L - 2:L - 2 + n],
                  np.zeros((B, H, n, D), np.float32), [k, buf]))
    # keys_out the very same view as values (not as keys): keys land on values before they are read
    k = rng.standard_normal((B, H, L, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    cases.append(("keys_out is values' front", k, v, idx, v[:, :, :n], np.zeros((B, H, n, D), np.float32), [k, v]))
    # the two outputs partly over each other
    k = rng.standard_normal((B, H, L, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    ob = np.zeros((B, H, n + 1, D), np.float32)
    cases.append(("values_out shifted over keys_out", k, v, idx, ob[:, :, :n], ob[:, :, 1:], [k, v, ob]))
    # an output over the indices themselves
    k = rng.standard_normal((B, H, L, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    ko = np.zeros((B, H, n, D), np.float32)
    shared_idx = ko.reshape(-1).view(np.int64)[: B * n].reshape(B, n)
    shared_idx[...] = idx
    cases.append(("keys_out over indices", k, v, shared_idx, ko, np.zeros((B, H, n, D), np.float32), [k, v, ko]))
    # in place, but the view is not the same: compaction into keys with another token stride
    buf = rng.standard_normal((B, H, L, D)).astype(np.float32)
    v = rng.standard_normal((B, H, L, D)).astype(np.float32)
    cases.append(("keys_out every other token of keys", buf, v, idx[:, :3] * 0 + np.array([0, 1, 2]), buf[:, :, 0:6:2],
                  np.zeros((B, H, 3, D), np.float32), [buf, v]))
    return cases


@pytest.mark.parametrize("case", range(len(overlap_cases())), ids=[c[0] for c in overlap_cases()])
def test_overlapping_outputs_are_refused(case):
    """Issue 20: only the very same view may be compacted in place; any other overlap of an output
    with an input or with the other output is a layout error, and nothing is written."""
    name, k, v, idx, ko, vo, buffers = overlap_cases()[case]
    before = [b.copy() for b in buffers]
    with pytest.raises(ValueError, match="overlap|share memory"):
        chunkkv.gather(k, v, idx, out=(ko, vo))
    for b, b0 in zip(buffers, before):
        assert np.array_equal(b, b0), f"{name}: written before the error"


def test_overlap_check_allows_what_is_safe():
    """In place on keys only, on values only; keys and values as one tensor or interleaved in one
    buffer (inputs may overlap each other); outputs side by side in one buffer."""
    rng = np.random.default_rng(21)
    B, H, L, D, n = 2, 2, 10, 4, 4
    idx = np.array([[0, 3, 4, 9], [1, 2, 5, 8]], np.int64)
    kv = rng.standard_normal((B, H, L, 2, D)).astype(np.float32)
    k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    want_k, want_v = ref.gather(k.copy(), v.copy(), idx)
    side = np.zeros((B, H, 2 * n, D), np.float32)
    ok, ov = chunkkv.gather(k, v, idx, out=(side[:, :, :n], side[:, :, n:]))
    assert np.array_equal(ok, want_k) and np.array_equal(ov, want_v)
    k2, v2 = k.copy(), v.copy()
    ok, ov = chunkkv.gather(k2, v2, idx, out=(k2[:, :, :n], np.zeros((B, H, n, D), np.float32)))
    assert np.array_equal(ok, want_k) and np.array_equal(ov, want_v)
    k2, v2 = k.copy(), v.copy()
    ok, ov = chunkkv.gather(k2, v2, idx, out=(np.zeros((B, H, n, D), np.float32), v2[:, :, :n]))
    assert np.array_equal(ok, want_k) and np.array_equal(ov, want_v)
    ok, ov = chunkkv.gather(k, k, idx)
    assert np.array_equal(ok, want_k) and np.array_equal(ov, want_k)
    kv2 = kv.copy()  # keys and values interleaved in one buffer, both compacted in place
    ck, cv = chunkkv.compact_(kv2[:, :, :, 0], kv2[:, :, :, 1], idx)
    assert np.shares_memory(ck, kv2) and np.array_equal(ck, want_k) and np.array_equal(cv, want_v)


def test_overlapping_torch_views_are_refused():
    need_torch()
    buf = torch.randn(1, 2, 9, 4)
    before = buf.clone()
    with pytest.raises(ValueError, match="overlap"):
        chunkkv.gather(buf[:, :, :8], torch.randn(1, 2, 8, 4), torch.tensor([[0, 1, 5]]),
                       out=(buf[:, :, 1:4], torch.zeros(1, 2, 3, 4)))
    assert torch.equal(buf, before)
