"""chunkkv.select against the reference.

Every random case is checked twice:
  * exactly, against the reference selection run on the C core's own float32 scores
    (chunkkv.score; heads summed in float32 in head order unless per_head), which pins down the
    selection logic bit for bit;
  * against the full float64 reference, where a row may differ only at a demonstrable near-tie:
    at the first step where the two selections part, the competing chunk sums (or token / pooled
    scores) differ by less than NEAR_TIE relative to the larger one. Such rows are counted.
"""
from __future__ import annotations

import numpy as np
import pytest

import chunkkv
import reference as ref
from conftest import DTYPES, LAYOUTS, lib_for, make, need_torch, random_shape, to_numpy, bits

N_CASES = 600
NEAR_TIE = 1e-5
METHODS = ("chunkkv", "snapkv", "streamingllm", "random")
I64_MAX = 2**63 - 1


def pick_budget(rng, L, w):
    opts = [w, w + 1, L - 1, L, L + 1 + int(rng.integers(0, 100)), int(rng.integers(w, L + 1)),
            int(rng.integers(w, L + 1)), int(rng.integers(w, L + 1))]
    return max(w, int(rng.choice(opts)))


def pick_chunk(rng, P):
    P1 = max(P, 1)
    opts = [1, 2, int(rng.integers(2, 17)), int(rng.integers(2, 33)), int(rng.integers(1, P1 + 1)), P1, P1 + 1,
            3 * P1 + 7, 10**12, I64_MAX]
    return int(rng.choice(opts, p=[.08, .08, .25, .15, .14, .08, .06, .06, .05, .05]))


#: share of random cases drawn as edge cases (budget >= L, budget == w, one chunk, tiny L ...); the rest are
#: real selections: several whole chunks kept, one cut, some dropped
EDGE_SHARE = 0.2


def real_selection(rng, L, w):
    """(budget, chunk size) that keep at least two whole chunks, cut one (unless the budget happens to be a
    multiple of the chunk) and drop at least a chunk's worth of the prefix; needs P = L - w >= 12."""
    P = L - w
    c = int(rng.integers(2, P // 4 + 1))
    return w + int(rng.integers(2 * c + 1, P - c + 1)), c


def is_real_selection(L, w, budget, chunk, starts) -> bool:
    """Whether every row of a chunkkv case keeps >= 2 whole chunks and drops some of its prefix."""
    first = 0 if starts is None else max(starts)
    return budget - w >= 2 * chunk and budget < L - first


def random_case(rng):
    B, Hkv, G, D, L, w = random_shape(rng, cost=4e5)
    edge = rng.random() < EDGE_SHARE
    if not edge and L - w < 12:  # a real selection needs a prefix to choose from
        L = int(rng.integers(16, 600))
        w = int(rng.integers(1, min(32, L // 4) + 1))
        B, Hkv, G = min(B, 2), min(Hkv, 2), min(G, 2)
    P = L - w
    method = str(rng.choice(METHODS, p=[0.55, 0.25, 0.1, 0.1]))
    dtype = str(rng.choice(DTYPES))
    lib = lib_for(dtype, rng)
    tq, tk = rng.choice([0.25, 0.5, 1.0, 2.0], size=2)
    q, q64 = make(rng.standard_normal((B, Hkv * G, w, D)) * tq, dtype, lib, str(rng.choice(LAYOUTS)))
    k, k64 = make(rng.standard_normal((B, Hkv, L, D)) * tk, dtype, lib, str(rng.choice(LAYOUTS)))
    budget, chunk = (pick_budget(rng, L, w), pick_chunk(rng, P)) if edge else real_selection(rng, L, w)
    Bp = max(budget - w, 0)
    args = dict(budget=budget, per_head=bool(rng.random() < 0.35), method=method)
    if rng.random() < 0.3:
        args["scale"] = float(rng.uniform(0.02, 0.4))
    if method == "chunkkv":
        args["chunk_size"] = chunk
    elif method == "snapkv":
        args["pool_kernel"] = int(rng.choice([1, 3, 5, 7, 2 * int(rng.integers(0, 16)) + 1, 2 * P + 1, 2 * P + 3]))
        args["pool"] = str(rng.choice(["avg", "max"]))
    elif method == "streamingllm":
        args["n_sink"] = int(rng.choice([0, 1, 4, Bp, Bp + 3, int(rng.integers(0, Bp + 2))]))
    else:
        args["seed"] = int(rng.integers(0, 2**63))  # select() takes seeds in [0, 2^63)
    starts = None
    if rng.random() < 0.15:  # left padding (in real cases, short enough to leave a choice)
        high = L + 1 if edge else max(1, (L - budget) // 2)
        starts = [int(s) for s in rng.integers(0, high, size=B)]
    return (q, q64, k, k64), args, starts


def check_invariants(idx, B, Hkv, L, w, budget, per_head, starts=None):
    n = min(budget, L)
    assert idx.shape == ((B, Hkv, n) if per_head else (B, n))
    assert idx.dtype == np.int64
    rows = idx.reshape(-1, n)
    for r, row in enumerate(rows):
        assert (np.diff(row) > 0).all(), "rows must be strictly increasing"
        assert row[0] >= 0 and row[-1] < L
        assert set(range(L - w, L)) <= set(row.tolist()), "the window is always kept"
        start = 0 if starts is None else starts[r // Hkv if per_head else r]
        if budget < L - start:
            assert row[0] >= start, "padding is never kept"


def compare_with_float64(got, s64, sC, L, w, args, starts, tally, case):
    """got (C) vs the float64 reference; a differing row must be a near-tie. Returns rows differing."""
    budget, per_head, method = args["budget"], args["per_head"], args["method"]
    full = ref.select(np.empty((s64.shape[0], 1, w, 1)), np.empty((s64.shape[0], s64.shape[1], L, 1)),
                      token_scores=s64, row_starts=starts, **args)
    n = got.shape[-1]
    g2, f2 = got.reshape(-1, n), full.reshape(-1, n)  # n >= w >= 1
    if method not in ("chunkkv", "snapkv"):
        assert np.array_equal(g2, f2)
        return 0
    R64 = ref.row_scores(None, None, per_head=per_head, token_scores=s64)
    RC = ref.row_scores(None, None, per_head=per_head, token_scores=sC)
    rows = np.nonzero((g2 != f2).any(axis=1))[0]
    if len(rows):  # a difference is explained by the C scores only if got is what they select
        own = ref.select(np.empty((s64.shape[0], 1, w, 1)), np.empty((s64.shape[0], s64.shape[1], L, 1)),
                         token_scores=sC, row_starts=starts, **args).reshape(-1, n)
        assert np.array_equal(g2[rows], own[rows]), "differs from what the C core's own scores select"
    differing = 0
    for r in rows:
        H = s64.shape[1]
        start = 0 if starts is None else starts[r // H if per_head else r]
        gap = ref.first_divergence(R64[r][start:], RC[r][start:], L - start, w, budget, method=method,
                                   chunk_size=args.get("chunk_size", 10), pool_kernel=args.get("pool_kernel", 1),
                                   pool=args.get("pool", "avg"))
        assert gap is not None, f"row {r}: differs from the float64 reference but not in the selection walk"
        assert gap <= NEAR_TIE, f"row {r}: differs from the float64 reference at a relative gap of {gap:.3e}"
        tally["near_ties"].append((f"select case {case} row {r}", gap))
        differing += 1
    return differing


@pytest.mark.parametrize("case", range(N_CASES))
def test_select_random(case, tally):
    rng = np.random.default_rng([202, case])
    (q, q64, k, k64), args, starts = random_case(rng)
    B, Hkv, L = k64.shape[:3]
    w = q64.shape[2]
    before = bits(q), bits(k)
    got = chunkkv.select(q, k, row_starts=starts, **args)
    assert type(got) is type(k)
    got = to_numpy(got)
    check_invariants(got, B, Hkv, L, w, args["budget"], args["per_head"], starts)

    scale = args.get("scale")
    sC = to_numpy(chunkkv.score(q, k, scale=scale, row_starts=starts))
    exact = ref.select(q64, k64, token_scores=sC, row_starts=starts, **args)
    assert np.array_equal(got, exact), "differs from the reference run on the C core's own scores"

    s64 = ref.score(q64, k64, scale, starts)
    compare_with_float64(got, s64, sC, L, w, args, starts, tally, case)
    assert np.array_equal(bits(q), before[0]) and np.array_equal(bits(k), before[1]), "inputs changed"
    tally["cases"]["select"] += 1
    if args["method"] == "chunkkv" and is_real_selection(L, w, args["budget"], args["chunk_size"], starts):
        tally["cases"]["select (chunkkv, >= 2 whole chunks kept and some dropped)"] += 1


def test_random_select_cases_are_mostly_real_selections():
    """At least 70% of the random chunkkv cases keep several whole chunks and drop some of the prefix."""
    cases = [random_case(np.random.default_rng([202, case])) for case in range(N_CASES)]
    chunkkv_cases = [(k64.shape[2], q64.shape[2], a, st) for (_, q64, _, k64), a, st in cases
                     if a["method"] == "chunkkv"]
    real = sum(is_real_selection(L, w, a["budget"], a["chunk_size"], st) for L, w, a, st in chunkkv_cases)
    assert real >= 0.7 * len(chunkkv_cases), f"{real} of {len(chunkkv_cases)}"


# ------------------------------------------------------------------ deliberate ties


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("c", [1, 3, 4, 7, 50, 10**9])
@pytest.mark.parametrize("zero", ["keys", "queries"])
def test_ties_resolve_to_lower_positions(c, per_head, zero):
    """Zero keys (or queries) make every logit 0: all token scores tie, so do all full chunks, and
    the prefix budget goes to the lowest positions."""
    B, Hkv, G, w, L, D = 2, 2, 3, 3, 40, 8
    rng = np.random.default_rng(c)
    q = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    (k if zero == "keys" else q)[...] = 0.0
    P = L - w
    for budget in (w, w + 1, w + 5, w + 8, w + 9, L - 1):
        Bp = budget - w
        want = np.r_[np.arange(Bp), np.arange(P, L)]
        got = chunkkv.select(q, k, budget=budget, chunk_size=c, per_head=per_head)
        assert np.array_equal(got.reshape(-1, budget), np.broadcast_to(want, (got.size // budget, budget)))
        assert np.array_equal(got, ref.select(q, k, budget=budget, chunk_size=c, per_head=per_head))
    for pool in ("avg", "max"):  # snapkv, kernel 1: plain ties; kernel 5 avg: edges lose their padding
        got = chunkkv.select(q, k, budget=w + 6, method="snapkv", pool_kernel=1, pool=pool, per_head=per_head)
        assert np.array_equal(got.reshape(-1, w + 6)[0], np.r_[np.arange(6), np.arange(P, L)])
    got = chunkkv.select(q, k, budget=w + 6, method="snapkv", pool_kernel=5, per_head=per_head)
    assert np.array_equal(got.reshape(-1, w + 6)[0], np.r_[np.arange(2, 8), np.arange(P, L)])


@pytest.mark.parametrize("c", [2, 5, 8])
def test_equal_chunks_resolve_to_lower_chunks(c, tally):
    """Keys repeating with period c give every full chunk the same score; whole chunks go to the
    lowest chunk positions and the cut chunk takes its best tokens."""
    rng = np.random.default_rng(c)
    B, Hkv, G, w, D = 2, 2, 2, 4, 16
    P = 9 * c + 1  # nine full chunks and a one-token tail
    L = P + w
    base = rng.standard_normal((B, Hkv, c, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    k[:, :, : 9 * c] = np.tile(base, (1, 1, 9, 1))
    k[:, :, 9 * c] = base[:, :, 0]
    q = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    s = chunkkv.score(q, k)
    assert np.array_equal(s[..., : 8 * c], s[..., c: 9 * c]), "premise: equal keys, equal scores"
    for per_head in (False, True):
        for Bp in (c, 3 * c, 3 * c + 1, 5 * c - 1):
            got = chunkkv.select(q, k, budget=Bp + w, chunk_size=c, per_head=per_head)
            whole = Bp // c
            rows = got.reshape(-1, Bp + w)
            for row in rows:
                assert set(range(whole * c)) <= set(row.tolist())
                assert (row[: Bp] < (whole + 1) * c).all()
            assert np.array_equal(got, ref.select(q, k, budget=Bp + w, chunk_size=c, per_head=per_head,
                                                  token_scores=s))
            # float64 scores of equal keys may differ in the last bit (BLAS): a near-tie at worst
            args = dict(budget=Bp + w, chunk_size=c, per_head=per_head, method="chunkkv")
            compare_with_float64(got, ref.score(q, k), s, L, w, args, None, tally, f"periodic c={c}")


def test_hand_computed_example():
    """One query, D = 1, keys log(t): attention is proportional to t.
    t = 1 1 | 8 1 | 6 1 | 1 1 | 2 2 | (window) 1, chunks of 2 score 2, 9, 7, 2, 4: budget 6 leaves
    Bp = 5: chunk [2,3], chunk [4,5], then chunk [8,9] does not fit whole: its best token, a tie
    broken to position 8."""
    t = np.array([1, 1, 8, 1, 6, 1, 1, 1, 2, 2, 1], dtype=np.float32)
    q = np.ones((1, 1, 1, 1), np.float32)
    k = np.log(t).reshape(1, 1, -1, 1).astype(np.float32)
    got = chunkkv.select(q, k, budget=6, chunk_size=2, scale=1.0)
    assert got.tolist() == [[2, 3, 4, 5, 8, 10]]
    assert got.tolist() == ref.select(q, k, budget=6, chunk_size=2, scale=1.0).tolist()
    # snapkv without pooling: the top 5 tokens 2 4 8 9, then the first of the 1s
    got = chunkkv.select(q, k, budget=6, method="snapkv", scale=1.0)
    assert got.tolist() == [[0, 2, 4, 8, 9, 10]]


def test_reference_selection_by_hand():
    """The reference's own walk on hand-made scores (guards the reference itself)."""
    s = np.array([1, 1, 5, 0, 0, 3, 2, 2, 4], dtype=np.float64)  # P = 9, chunks of 3: 7, 3, 8
    assert ref.chunkkv_walk(s, 5, 3) == [(2, [6, 7, 8]), (0, [0, 2])]
    assert ref.chunkkv_walk(s, 6, 3) == [(2, [6, 7, 8]), (0, [0, 1, 2])]
    assert ref.chunkkv_walk(s, 7, 3) == [(2, [6, 7, 8]), (0, [0, 1, 2]), (1, [5])]
    assert ref.select_row(s, 11, 2, 7, chunk_size=3).tolist() == [0, 2, 6, 7, 8, 9, 10]
    assert ref.pooled(np.array([3.0, 0, 0, 6]), 3, False).tolist() == [1.0, 1.0, 2.0, 2.0]
    assert ref.pooled(np.array([3.0, 0, 0, 6]), 3, True).tolist() == [3.0, 3.0, 6.0, 6.0]
    assert ref.first_divergence(s, s, 11, 2, 7, chunk_size=3) is None
    s2 = s.copy()
    s2[1] += 2.0  # chunk 0 (now 9) outranks chunk 2 (8); in s their sums are 7 and 8
    assert ref.first_divergence(s, s2, 11, 2, 7, chunk_size=3) == pytest.approx(1 / 8)


def test_near_tie_acceptance():
    """The float64 comparison accepts a difference only where the reference has a near-tie."""
    local = {"cases": {}, "near_ties": []}
    L, w = 12, 2
    # chunks of 2: sums 0.3, 0.7, 0.7 + 1e-9, 0.1, 0.3; in float32 chunks 1 and 2 tie exactly
    s64 = np.array([0.1, 0.2, 0.35, 0.35, 0.35, 0.35 + 1e-9, 0.05, 0.05, 0.2, 0.1])[None, None]
    sC = s64.astype(np.float32)
    assert sC[0, 0, 4] == sC[0, 0, 5]
    dummy_q, dummy_k = np.empty((1, 1, w, 1)), np.empty((1, 1, L, 1))
    for budget in (4, 3):  # chunk 1 instead of chunk 2 / chunk 2 cut to token 4 instead of 5
        args = dict(budget=budget, chunk_size=2 if budget == 4 else 1, per_head=False, method="chunkkv")
        if budget == 3:  # one token: tokens 4 and 5 compete directly
            args["chunk_size"] = 10
        got = ref.select(dummy_q, dummy_k, token_scores=sC, **args)
        full = ref.select(dummy_q, dummy_k, token_scores=s64, **args)
        assert not np.array_equal(got, full)
        assert compare_with_float64(got, s64, sC, L, w, args, None, local, "synthetic") == 1
        assert local["near_ties"][-1][1] < 1e-8
        # a selection that is simply wrong is not excused
        wrong = got.copy()
        wrong[0, 0] = 0 if wrong[0, 0] != 0 else 1
        wrong.sort(axis=1)
        with pytest.raises(AssertionError):
            compare_with_float64(wrong, s64, sC, L, w, args, None, local, "synthetic")
    # snapkv: pooled scores around the Bp-th best
    args = dict(budget=3, per_head=False, method="snapkv", pool_kernel=1, pool="avg")
    got = ref.select(dummy_q, dummy_k, token_scores=sC, **args)
    assert compare_with_float64(got, s64, sC, L, w, args, None, local, "synthetic") == 1


# ------------------------------------------------------------------ the other methods and edges


def test_streamingllm_explicit():
    q = np.ones((1, 1, 3, 8), np.float32)
    k = np.ones((1, 1, 20, 8), np.float32)
    assert chunkkv.select(q, k, budget=10, method="streamingllm").tolist() == [[0, 1, 2, 3, 14, 15, 16, 17, 18, 19]]
    assert chunkkv.select(q, k, budget=5, method="streamingllm", n_sink=9).tolist() == [[0, 1, 17, 18, 19]]
    assert chunkkv.select(q, k, budget=6, method="streamingllm", n_sink=0).tolist() == [[14, 15, 16, 17, 18, 19]]


def test_random_method():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 2, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 100, 8)).astype(np.float32)
    a = chunkkv.select(q, k, budget=30, method="random", seed=5, per_head=True)
    assert np.array_equal(a, chunkkv.select(q, k, budget=30, method="random", seed=5, per_head=True))
    assert not np.array_equal(a, chunkkv.select(q, k, budget=30, method="random", seed=6, per_head=True))
    rows = a.reshape(-1, 30)
    assert len({tuple(r) for r in rows.tolist()}) == 4, "every row draws its own positions"
    assert np.array_equal(a, ref.select(q, k, budget=30, method="random", seed=5, per_head=True))
    big = 2**63 - 1  # the largest seed select() takes
    assert np.array_equal(chunkkv.select(q, k, budget=30, method="random", seed=big),
                          ref.select(q, k, budget=30, method="random", seed=big))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("L,w", [(1, 1), (7, 7), (7, 1), (50, 3)])
def test_budget_edges(method, L, w):
    rng = np.random.default_rng(L * 10 + w)
    q = rng.standard_normal((2, 2, w, 8)).astype(np.float32)
    k = rng.standard_normal((2, 1, L, 8)).astype(np.float32)
    for budget in sorted({w, w + 1, L - 1, L, L + 1, 10**15}):
        if budget < w:
            continue
        got = chunkkv.select(q, k, budget=budget, method=method)
        assert got.shape == (2, min(budget, L))
        if budget >= L:
            assert np.array_equal(got, np.broadcast_to(np.arange(L), (2, L)))
        if budget == w:
            assert np.array_equal(got, np.broadcast_to(np.arange(L - w, L), (2, w)))
        assert np.array_equal(got, ref.select(q, k, budget=budget, method=method,
                                              token_scores=chunkkv.score(q, k)))


def test_select_deterministic_across_threads():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((3, 8, 4, 32)).astype(np.float32)
    k = rng.standard_normal((3, 4, 700, 32)).astype(np.float32)
    out = []
    try:
        for n in (1, 2, 3):
            chunkkv.set_num_threads(n)
            out.append([chunkkv.select(q, k, budget=99, chunk_size=7, per_head=ph, method=m)
                        for ph in (False, True) for m in METHODS])
    finally:
        chunkkv.set_num_threads(0)
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert np.array_equal(a, b)


def test_compress_matches_select_and_gather():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float16)
    k = rng.standard_normal((2, 2, 60, 16)).astype(np.float16)
    v = rng.standard_normal((2, 2, 60, 16)).astype(np.float16)
    kk, vv, idx = chunkkv.compress(q, k, v, budget=20, chunk_size=4, per_head=True)
    assert np.array_equal(idx, chunkkv.select(q, k, budget=20, chunk_size=4, per_head=True))
    rk, rv = ref.gather(k, v, idx)
    assert np.array_equal(kk, rk) and np.array_equal(vv, rv) and kk.dtype == np.float16


def test_torch_and_numpy_agree():
    need_torch()
    import torch

    rng = np.random.default_rng(8)
    q = rng.standard_normal((2, 6, 4, 32)).astype(np.float32)
    k = rng.standard_normal((2, 3, 300, 32)).astype(np.float32)
    for ph in (False, True):
        a = chunkkv.select(q, k, budget=64, per_head=ph)
        b = chunkkv.select(torch.from_numpy(q), torch.from_numpy(k), budget=64, per_head=ph)
        assert isinstance(b, torch.Tensor) and b.dtype == torch.int64
        assert np.array_equal(a, b.numpy())
    qb, kb = torch.from_numpy(q).bfloat16(), torch.from_numpy(k).bfloat16()
    got = chunkkv.select(qb, kb, budget=64)
    assert np.array_equal(got.numpy(), ref.select(ref.to_f64(qb), ref.to_f64(kb), budget=64,
                                                  token_scores=chunkkv.score(qb, kb).numpy()))


# ------------------------------------------------------------------ select_from_scores

SCORE_METHODS = ("chunkkv", "snapkv")  # h2o has its own test: its scores come from every prompt query


def summed(sC: np.ndarray, per_head: bool) -> np.ndarray:
    """What select ranks: the per-head scores, or their float32 sum in head order (as a rank holds
    them after an all-reduce in that order)."""
    return sC if per_head else ref.sum_heads(sC)


@pytest.mark.parametrize("case", range(200))
def test_select_from_scores_equals_select(case):
    """select_from_scores(score(q, k) summed over heads) == select(q, k), and == the reference, on the
    random cases of test_select_random (row_starts, per_head, every dtype and layout, chunk edges)."""
    rng = np.random.default_rng([303, case])
    (q, q64, k, k64), args, starts = random_case(rng)
    if args["method"] not in SCORE_METHODS:
        args = dict(budget=args["budget"], per_head=args["per_head"], method="chunkkv",
                    chunk_size=pick_chunk(rng, k64.shape[2] - q64.shape[2]))
    per_head, scale = args.pop("per_head"), args.pop("scale", None)
    L, w = k64.shape[2], q64.shape[2]
    want = to_numpy(chunkkv.select(q, k, per_head=per_head, scale=scale, row_starts=starts, **args))
    S = summed(to_numpy(chunkkv.score(q, k, scale=scale, row_starts=starts)), per_head)
    if type(k).__module__.startswith("torch"):
        import torch

        S = torch.from_numpy(S)
    before = bits(S)
    got = chunkkv.select_from_scores(S, length=L, row_starts=starts, **args)
    assert type(got) is type(S)
    got = to_numpy(got)
    check_invariants(got, *k64.shape[:2], L, w, args["budget"], per_head, starts)
    assert np.array_equal(got, want), "differs from select on the same queries and keys"
    assert np.array_equal(got, ref.select_from_scores(to_numpy(S), L, row_starts=starts, **args))
    assert np.array_equal(bits(S), before), "scores changed"


@pytest.mark.parametrize("case", range(60))
def test_select_from_scores_tied_scores(case):
    """Scores drawn from a few values (ties everywhere: tokens, chunks, pooled values) against the
    reference, with multi-chunk prefixes, short last chunks, row_starts, per_head and both pools."""
    rng = np.random.default_rng([304, case])
    B, H = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    P = int(rng.integers(1, 120))
    L = P + int(rng.choice([0, 1, 3, int(rng.integers(0, 20))]))
    per_head = bool(rng.random() < 0.4)
    shape = (B, H, P) if per_head else (B, P)
    S = rng.integers(0, int(rng.choice([1, 2, 4])), size=shape).astype(np.float32) * np.float32(0.25)
    method = str(rng.choice(["chunkkv", "snapkv", "h2o"]))
    budget = int(rng.choice([L - P, L - P + 1, L - 1, L, L + 5, int(rng.integers(L - P, L + 1))]))
    budget = max(budget, L - P)
    args = dict(budget=budget, method=method)
    if method == "chunkkv":
        args["chunk_size"] = int(rng.choice([1, 2, 3, 7, 10, P, P + 1, 10**12]))
    elif method == "snapkv":
        args["pool_kernel"] = int(rng.choice([1, 3, 5, 2 * P + 1]))
        args["pool"] = str(rng.choice(["avg", "max"]))
    starts = [int(s) for s in rng.integers(0, L + 1, size=B)] if rng.random() < 0.3 else None
    got = chunkkv.select_from_scores(S, length=L, row_starts=starts, **args)
    assert np.array_equal(got, ref.select_from_scores(S, L, row_starts=starts, **args))
    if min(budget, L) > 0:
        check_invariants(got, B, H, L, L - P, budget, per_head, starts)


def test_select_from_scores_ties_go_to_lower_positions():
    P, L = 23, 26
    for per_head in (False, True):
        S = np.zeros((2, 3, P) if per_head else (2, P), np.float32)
        for method, c in (("chunkkv", 4), ("chunkkv", 5), ("snapkv", 1), ("h2o", 1)):
            for Bp in (0, 1, 4, 6, 9, P - 1):
                got = chunkkv.select_from_scores(S, length=L, budget=Bp + L - P, method=method, chunk_size=c)
                want = np.r_[np.arange(Bp), np.arange(P, L)]
                assert np.array_equal(got.reshape(-1, Bp + L - P), np.broadcast_to(want, (got.size // len(want),
                                                                                          len(want))))


def test_select_from_scores_h2o_equals_select():
    """H2O: scores of every prompt query over P = L - window, summed over heads."""
    rng = np.random.default_rng(5)
    for B, Hkv, G, L, window, budget in ((2, 2, 2, 50, 6, 20), (1, 3, 1, 37, 1, 1), (3, 1, 4, 64, 8, 63)):
        q = rng.standard_normal((B, Hkv * G, L, 16)).astype(np.float32)
        k = rng.standard_normal((B, Hkv, L, 16)).astype(np.float32)
        starts = [int(s) for s in rng.integers(0, L // 2, size=B)]
        for per_head in (False, True):
            for rs in (None, starts):
                want = chunkkv.select(q, k, budget=budget, method="h2o", window=window, per_head=per_head,
                                      row_starts=rs)
                S = summed(chunkkv.score(q, k, prefix=L - window, row_starts=rs), per_head)
                got = chunkkv.select_from_scores(S, length=L, budget=budget, method="h2o", row_starts=rs)
                assert np.array_equal(got, want)
                assert np.array_equal(got, ref.select_from_scores(S, L, budget=budget, method="h2o", row_starts=rs))


def test_select_from_scores_edges():
    rng = np.random.default_rng(6)
    S = rng.random((2, 30)).astype(np.float32)
    # no window (L == P): the whole budget goes to the prefix
    got = chunkkv.select_from_scores(S, length=30, budget=7, chunk_size=3)
    assert got.shape == (2, 7) and np.array_equal(got, ref.select_from_scores(S, 30, budget=7, chunk_size=3))
    # budget == w keeps the window only; budget >= L keeps everything
    assert np.array_equal(chunkkv.select_from_scores(S, length=34, budget=4), np.broadcast_to(np.arange(30, 34), (2, 4)))
    for budget in (34, 35, 10**15):
        assert np.array_equal(chunkkv.select_from_scores(S, length=34, budget=budget),
                              np.broadcast_to(np.arange(34), (2, 34)))
    # an empty prefix, an empty batch, an empty selection
    assert np.array_equal(chunkkv.select_from_scores(np.zeros((2, 0), np.float32), length=5, budget=5),
                          np.broadcast_to(np.arange(5), (2, 5)))
    assert chunkkv.select_from_scores(np.zeros((0, 3, 9), np.float32), length=12, budget=4).shape == (0, 3, 4)
    assert chunkkv.select_from_scores(np.zeros((2, 9), np.float32), length=9, budget=0).shape == (2, 0)
    # a row that is all padding, a row that starts at 0
    got = chunkkv.select_from_scores(S, length=34, budget=10, row_starts=[34, 0])
    assert np.array_equal(got[0], np.arange(24, 34))
    assert np.array_equal(got, ref.select_from_scores(S, 34, budget=10, row_starts=[34, 0]))


def test_select_from_scores_tensor_parallel():
    """Two simulated tensor-parallel ranks score their own KV heads, all-reduce (sum) the per-token
    scores and select: both ranks get the same positions, exactly what the reference selects from
    the reduced scores, and what one process selects unless a near-tie (the reduction adds in
    another order) parts them."""
    need_torch()
    import torch

    rng = np.random.default_rng(7)
    B, Hkv, G, w, L, D = 2, 4, 2, 8, 400, 32
    q = torch.from_numpy(rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32))
    k = torch.from_numpy(rng.standard_normal((B, Hkv, L, D)).astype(np.float32))
    partial = [chunkkv.score(q[:, r * G * 2:(r + 1) * G * 2], k[:, r * 2:(r + 1) * 2]).sum(1) for r in range(2)]
    reduced = partial[0] + partial[1]
    picks = [chunkkv.select_from_scores(reduced.clone(), length=L, budget=64, chunk_size=10) for _ in range(2)]
    assert torch.equal(picks[0], picks[1])
    assert np.array_equal(picks[0].numpy(), ref.select_from_scores(reduced.numpy(), L, budget=64, chunk_size=10))
    single = chunkkv.select(q, k, budget=64, chunk_size=10)
    s64 = ref.sum_heads(ref.score(q, k))
    for b in range(B):
        if not torch.equal(single[b], picks[0][b]):
            gap = ref.first_divergence(s64[b], reduced[b].numpy(), L, w, 64, chunk_size=10)
            assert gap is not None and gap <= NEAR_TIE
    # a non-contiguous view of the scores is read as the values it shows
    wide = torch.zeros(B, 2 * (L - w))
    wide[:, ::2] = reduced
    assert torch.equal(chunkkv.select_from_scores(wide[:, ::2], length=L, budget=64), picks[0])
