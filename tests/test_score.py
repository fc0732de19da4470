"""chunkkv.score against the float64 reference: random shapes, dtypes, layouts, both frameworks."""
from __future__ import annotations

import numpy as np
import pytest

import chunkkv
import reference as ref
from conftest import DTYPES, LAYOUTS, bits, lib_for, make, need_torch, random_shape, to_numpy

N_CASES = 200
RTOL = 5e-5  # fp32 logits, a polynomial exp (2e-7) and fp32 sums over G*w rows: observed < 1e-5


def assert_scores_close(got, want):
    got = to_numpy(got).astype(np.float64)
    assert got.shape == want.shape and got.dtype == np.float64
    # relative per element; the absolute floor covers exp() flushed to 0 below e^-87
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-30)


def random_inputs(rng, B, Hkv, G, D, L, w):
    dtype = str(rng.choice(DTYPES))
    lib = lib_for(dtype, rng)
    qdtype = dtype if rng.random() < 0.8 else ("float32" if dtype != "float32" else "float16")
    tq, tk = rng.choice([0.25, 0.5, 1.0, 2.0], size=2)
    q, q64 = make(rng.standard_normal((B, Hkv * G, w, D)) * tq, qdtype, lib, str(rng.choice(LAYOUTS)))
    k, k64 = make(rng.standard_normal((B, Hkv, L, D)) * tk, dtype, lib, str(rng.choice(LAYOUTS)))
    return q, q64, k, k64


@pytest.mark.parametrize("case", range(N_CASES))
def test_score_random(case, tally):
    rng = np.random.default_rng([101, case])
    B, Hkv, G, D, L, w = random_shape(rng)
    q, q64, k, k64 = random_inputs(rng, B, Hkv, G, D, L, w)
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.02, 0.5))
    starts = None
    if rng.random() < 0.2:  # left padding: any start in [0, L]
        starts = [int(s) for s in rng.integers(0, L + 1, size=B)]
    before = bits(q), bits(k)
    got = chunkkv.score(q, k, scale=scale, row_starts=starts)
    assert type(got) is type(k)
    assert tuple(got.shape) == (B, Hkv, L - w)
    assert_scores_close(got, ref.score(q64, k64, scale, starts))
    assert np.array_equal(bits(q), before[0]) and np.array_equal(bits(k), before[1])
    tally["cases"]["score"] += 1


def test_score_properties():
    """Each window query spreads a total of 1 over the keys it sees, so the prefix takes the rest."""
    rng = np.random.default_rng(7)
    B, Hkv, G, w, L, D = 2, 3, 2, 5, 40, 16
    q = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    s = chunkkv.score(q, k)
    assert s.dtype == np.float32 and s.flags.c_contiguous
    assert (s > 0).all()
    assert (s.sum(-1) < G * w).all()
    # a single window query over uniform keys: every prefix token gets 1/L
    s1 = chunkkv.score(np.ones((1, 1, 1, 4), np.float32), np.zeros((1, 1, L, 4), np.float32))
    np.testing.assert_allclose(s1, np.full((1, 1, L - 1), 1.0 / L), rtol=1e-6)


@pytest.mark.parametrize("w", [1, 3, 17])
def test_score_window_is_causal(w):
    """Changing a key inside the window changes only what the window queries after it see."""
    rng = np.random.default_rng(w)
    L, D = 30, 8
    q = rng.standard_normal((1, 2, w, D)).astype(np.float32)
    k = rng.standard_normal((1, 1, L, D)).astype(np.float32)
    k2 = k.copy()
    k2[0, 0, L - 1] += 5.0  # only the last window query sees the last key
    a, b = chunkkv.score(q, k), chunkkv.score(q, k2)
    assert_scores_close(b, ref.score(q, k2))
    # the first w - 1 window queries did not see the change: the difference is the last one's alone
    q_last = q[:, :, -1:]
    diff = b.astype(np.float64) - a.astype(np.float64)
    last = ref.score(q_last, k2)[..., : L - w] - ref.score(q_last, k)[..., : L - w]
    np.testing.assert_allclose(diff, last, rtol=1e-3, atol=1e-5 * 2 * w)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_score_long_context_in_head_passes(dtype, tally):
    """At long L the core scores a KV head's query heads in several passes (so their numerators stay in
    cache; score.c, CKV_NUMER_FLOATS): 64 queries x 40,000 keys is over that budget, so each of the G = 3
    heads is its own pass, and spans of 1024 keys see running maxima that change (a late large logit)."""
    rng = np.random.default_rng(7)
    B, Hkv, G, w, L, D = 1, 2, 3, 64, 40_000, 16
    lib = "torch" if dtype == "bfloat16" else "numpy"
    if lib == "torch":
        need_torch()
    kv = rng.standard_normal((B, Hkv, L, D))
    kv[:, :, L // 2] *= 6.0  # a key far above the others halfway: the running maximum jumps there
    q, q64 = make(rng.standard_normal((B, Hkv * G, w, D)), dtype, lib)
    k, k64 = make(kv, dtype, lib)
    for starts in (None, [12_345]):
        got = chunkkv.score(q, k, row_starts=starts)
        assert_scores_close(got, ref.score(q64, k64, None, starts))
        tally["cases"]["score"] += 1


@pytest.mark.parametrize("L,w", [(1, 1), (5, 5), (64, 64), (3000, 1), (2999, 2)])
def test_score_edges(L, w):
    rng = np.random.default_rng(L * 7 + w)
    q = rng.standard_normal((1, 4, w, 32)).astype(np.float32)
    k = rng.standard_normal((1, 2, L, 32)).astype(np.float32)
    s = chunkkv.score(q, k)
    assert s.shape == (1, 2, L - w)
    assert_scores_close(s, ref.score(q, k))


def test_score_empty_batch():
    s = chunkkv.score(np.zeros((0, 2, 3, 8), np.float32), np.zeros((0, 1, 10, 8), np.float32))
    assert s.shape == (0, 1, 7)


def test_score_torch_matches_numpy():
    need_torch()
    import torch

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 50, 16)).astype(np.float32)
    a = chunkkv.score(q, k)
    b = chunkkv.score(torch.from_numpy(q), torch.from_numpy(k))
    assert isinstance(b, torch.Tensor) and b.dtype == torch.float32
    assert np.array_equal(a, b.numpy())  # the same kernel on the same values: bit for bit


def test_score_deterministic_across_threads():
    rng = np.random.default_rng(5)
    q = rng.standard_normal((3, 8, 4, 32)).astype(np.float32)
    k = rng.standard_normal((3, 4, 500, 32)).astype(np.float32)
    try:
        chunkkv.set_num_threads(1)
        a = chunkkv.score(q, k)
        chunkkv.set_num_threads(2)
        b = chunkkv.score(q, k)
    finally:
        chunkkv.set_num_threads(0)
    assert np.array_equal(a, b)
