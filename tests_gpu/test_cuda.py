"""The CUDA kernels against the CPU core and the NumPy reference (needs a GPU; not under tests/).

Run: python -m pytest tests_gpu -q   (after CHUNKKV_CUDA=1 pip install -e . on a machine with nvcc and a GPU), or
all of the GPU check at once: python3 tools/gpu_check.py

  * score: CUDA scores vs the float64 reference (the CPU tests' tolerance) and vs the CPU core;
    a NaN a row's query sees poisons exactly that (b, g), NaN in masked padding does not.
  * select: bit for bit equal to the reference selection run on the CUDA scores themselves
    (chunkkv.score on the GPU), which pins the selection logic down exactly; vs the CPU core,
    a row may differ only at a near-tie of the two cores' float32 scores.
  * gather / compact_: bit-exact copies, any strides, in place, guard regions untouched.
  * the caller's stream is used and nothing waits for the GPU (chunkkv-kvpress only where a row can pad);
    a CuPy producer on its own stream is ordered before the kernels (DLPack stream exchange);
    tensors on another GPU work.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the CUDA tests need torch")
if not torch.cuda.is_available():
    pytest.skip("the CUDA tests need a GPU: torch.cuda.is_available() is False", allow_module_level=True)

import chunkkv  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import reference as ref  # noqa: E402

DTYPES = ("float32", "float16", "bfloat16")
LAYOUTS = ("contiguous", "bhld_T", "step", "broadcast", "fortran")
NEAR_TIE = 1e-4  # relative gap between the CPU's and the GPU's float32 scores a row may differ at
SCORE_RTOL = 5e-5  # as tests/test_score.py allows the CPU against the float64 reference
METHODS = ("chunkkv", "snapkv", "streamingllm", "random")
DEV = torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def _built_with_cuda():
    assert chunkkv.build_info()["cuda"], "chunkkv was built without CUDA: reinstall with CHUNKKV_CUDA=1 pip install -e . (nvcc needed)"


# ----------------------------------------------------------------------------- helpers


def tdtype(name: str):
    return getattr(torch, name)


def make(vals: np.ndarray, dtype: str, layout: str, device=DEV):
    """A [B, H, L, D] CUDA tensor holding vals (rounded to dtype) in a given memory layout."""
    B, H, L, D = vals.shape
    src = torch.from_numpy(np.ascontiguousarray(vals)).to(tdtype(dtype))
    if layout == "broadcast":  # stride 0 over heads
        return src[:, :1].to(device).expand(B, H, L, D)
    if layout == "contiguous":
        view = torch.empty((B, H, L, D), dtype=tdtype(dtype), device=device)
    elif layout == "bhld_T":
        view = torch.empty((B, L, H, D), dtype=tdtype(dtype), device=device).transpose(1, 2)
    elif layout == "step":
        view = torch.zeros((B, H, 2 * L + 1, 3 * D), dtype=tdtype(dtype), device=device)[:, :, 1::2, 1::3]
    elif layout == "fortran":
        view = torch.empty((D, L, H, B), dtype=tdtype(dtype), device=device).permute(3, 2, 1, 0)
    else:
        raise ValueError(layout)
    view.copy_(src.to(device))
    return view


def f64(x) -> np.ndarray:
    return ref.to_f64(x)


def np_of(x) -> np.ndarray:
    x = x.detach().cpu()
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy().copy()


def bits(x) -> np.ndarray:
    x = x.detach().cpu()
    x = x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x
    return np.ascontiguousarray(x.numpy()).view(np.uint8).copy()


def random_shape(rng, cost=1.5e6):
    B = int(rng.integers(1, 4))
    Hkv, G = int(rng.choice([1, 2, 3, 4, 8])), int(rng.choice([1, 2, 3, 4, 8]))
    D = int(rng.choice([1, 8, 16, 24, 64, 128, 200]))
    u = rng.random()
    L = int(rng.integers(1, 41) if u < 0.25 else rng.integers(41, 401) if u < 0.7 else rng.integers(401, 3001))
    u = rng.random()
    w = 1 if u < 0.2 else L if u < 0.3 else int(rng.integers(1, min(L, 40) + 1)) if u < 0.85 else int(
        rng.integers(1, L + 1))
    while B * Hkv * G * w * L > cost and (w > 1 or G > 1 or Hkv > 1 or B > 1):
        if w > 1:
            w = max(1, w // 2)
        elif G > 1:
            G //= 2
        elif Hkv > 1:
            Hkv //= 2
        else:
            B -= 1
    return B, Hkv, G, D, L, w


def random_qk(rng, B, Hkv, G, D, L, w):
    dtype = str(rng.choice(DTYPES))
    qdtype = dtype if rng.random() < 0.8 else ("float32" if dtype != "float32" else "float16")
    tq, tk = rng.choice([0.25, 0.5, 1.0, 2.0], size=2)
    q = make(rng.standard_normal((B, Hkv * G, w, D)) * tq, qdtype, str(rng.choice(LAYOUTS)))
    k = make(rng.standard_normal((B, Hkv, L, D)) * tk, dtype, str(rng.choice(LAYOUTS)))
    return q, k


def random_starts(rng, B, L, p=0.2):
    return [int(s) for s in rng.integers(0, L + 1, size=B)] if rng.random() < p else None


# ----------------------------------------------------------------------------- build


def test_build_reports_cuda():
    info = chunkkv.build_info()
    assert info["cuda"] is True


# ----------------------------------------------------------------------------- score


@pytest.mark.parametrize("case", range(60))
def test_score_matches_reference_and_cpu(case):
    rng = np.random.default_rng([901, case])
    B, Hkv, G, D, L, w = random_shape(rng)
    q, k = random_qk(rng, B, Hkv, G, D, L, w)
    scale = None if rng.random() < 0.6 else float(rng.uniform(0.02, 0.5))
    starts = random_starts(rng, B, L)
    before = bits(q), bits(k)
    got = chunkkv.score(q, k, scale=scale, row_starts=starts)
    assert got.is_cuda and got.dtype == torch.float32 and tuple(got.shape) == (B, Hkv, L - w)
    assert got.device == k.device
    g = np_of(got).astype(np.float64)
    np.testing.assert_allclose(g, ref.score(f64(q), f64(k), scale, starts), rtol=SCORE_RTOL, atol=1e-30)
    cpu = chunkkv.score(q.cpu(), k.cpu(), scale=scale, row_starts=starts)
    np.testing.assert_allclose(g, np_of(cpu), rtol=2 * SCORE_RTOL, atol=1e-30)
    assert np.array_equal(bits(q), before[0]) and np.array_equal(bits(k), before[1]), "inputs changed"


def test_score_large_rows_and_keys():
    """Many row tiles (G*w = 320) and key splits: against the CPU core."""
    rng = np.random.default_rng(5)
    q = make(rng.standard_normal((2, 16, 40, 64)), "bfloat16", "bhld_T")
    k = make(rng.standard_normal((2, 2, 9000, 64)), "bfloat16", "contiguous")
    got = np_of(chunkkv.score(q, k, row_starts=[0, 1234]))
    want = np_of(chunkkv.score(q.cpu(), k.cpu(), row_starts=[0, 1234]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-30)
    assert (got[1, :, :1234] == 0).all()


def test_score_nonfinite_poisons_only_its_head():
    rng = np.random.default_rng(3)
    B, Hkv, G, w, L, D = 2, 3, 2, 4, 300, 16
    qn = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    kn = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    kn[1, 2, 77, 5] = np.nan  # seen by every query of (b=1, g=2)
    kn[0, 1, 3, 0] = np.inf   # padding of row 0 (starts at 10): masked out, no effect
    q, k = torch.from_numpy(qn).to(DEV), torch.from_numpy(kn).to(DEV)
    starts = [10, 0]
    got = np_of(chunkkv.score(q, k, row_starts=starts))
    cpu = chunkkv.score(qn, kn, row_starts=starts)
    assert np.isnan(got[1, 2]).all() and np.isnan(cpu[1, 2]).all()
    ok = np.ones((B, Hkv), bool)
    ok[1, 2] = False
    assert np.isfinite(got[ok]).all()
    np.testing.assert_allclose(got[ok], cpu[ok], rtol=1e-4, atol=1e-30)


# ----------------------------------------------------------------------------- select


def random_select_args(rng, L, w):
    P = L - w
    method = str(rng.choice(METHODS, p=[0.55, 0.25, 0.1, 0.1]))
    budget = max(w, int(rng.choice([w, w + 1, L - 1, L, L + 5, int(rng.integers(w, L + 1)),
                                     int(rng.integers(w, L + 1)), int(rng.integers(w, L + 1))])))
    Bp = max(budget - w, 0)
    args = dict(budget=budget, per_head=bool(rng.random() < 0.35), method=method)
    if rng.random() < 0.3:
        args["scale"] = float(rng.uniform(0.02, 0.4))
    if method == "chunkkv":
        P1 = max(P, 1)
        args["chunk_size"] = int(rng.choice([1, 2, int(rng.integers(2, 17)), int(rng.integers(2, 33)),
                                             int(rng.integers(1, P1 + 1)), P1, P1 + 1, 10**12]))
    elif method == "snapkv":
        args["pool_kernel"] = int(rng.choice([1, 3, 5, 7, 2 * int(rng.integers(0, 16)) + 1, 2 * P + 1]))
        args["pool"] = str(rng.choice(["avg", "max"]))
    elif method == "streamingllm":
        args["n_sink"] = int(rng.choice([0, 1, 4, Bp, Bp + 3]))
    else:
        args["seed"] = int(rng.integers(0, 2**63))
    return args


def check_invariants(idx, B, Hkv, L, w, budget, per_head, starts):
    n = min(budget, L)
    assert idx.shape == ((B, Hkv, n) if per_head else (B, n))
    for r, row in enumerate(idx.reshape(-1, n)):
        assert (np.diff(row) > 0).all(), "rows must be strictly increasing"
        assert row[0] >= 0 and row[-1] < L
        assert set(range(L - w, L)) <= set(row.tolist()), "the window is always kept"
        start = 0 if starts is None else starts[r // Hkv if per_head else r]
        if budget < L - start:
            assert row[0] >= start, "padding is never kept"


def compare_rows_with_cpu(got, cpu, s_gpu, s_cpu, L, w, args, starts):
    """Rows where the GPU and the CPU selections differ must be near-ties of their scores."""
    n = got.shape[-1]
    g2, c2 = got.reshape(-1, n), cpu.reshape(-1, n)
    if args["method"] not in ("chunkkv", "snapkv"):
        assert np.array_equal(g2, c2)
        return 0
    H = s_gpu.shape[1]
    RG = ref.row_scores(None, None, per_head=args["per_head"], token_scores=s_gpu)
    RC = ref.row_scores(None, None, per_head=args["per_head"], token_scores=s_cpu)
    differing = 0
    for r in np.nonzero((g2 != c2).any(axis=1))[0]:
        start = 0 if starts is None else starts[r // H if args["per_head"] else r]
        gap = ref.first_divergence(RC[r][start:], RG[r][start:], L - start, w, args["budget"],
                                   method=args["method"], chunk_size=args.get("chunk_size", 10),
                                   pool_kernel=args.get("pool_kernel", 1), pool=args.get("pool", "avg"))
        assert gap is not None and gap <= NEAR_TIE, f"row {r}: GPU and CPU differ at a relative gap of {gap}"
        differing += 1
    return differing


@pytest.mark.parametrize("case", range(150))
def test_select_matches_reference_and_cpu(case):
    rng = np.random.default_rng([902, case])
    B, Hkv, G, D, L, w = random_shape(rng, cost=8e5)
    q, k = random_qk(rng, B, Hkv, G, D, L, w)
    args = random_select_args(rng, L, w)
    starts = random_starts(rng, B, L, p=0.15)
    got_t = chunkkv.select(q, k, row_starts=starts, **args)
    assert got_t.is_cuda and got_t.dtype == torch.int64 and got_t.device == k.device
    got = got_t.cpu().numpy()
    check_invariants(got, B, Hkv, L, w, args["budget"], args["per_head"], starts)

    s_gpu = np_of(chunkkv.score(q, k, scale=args.get("scale"), row_starts=starts))
    exact = ref.select(f64(q), f64(k), token_scores=s_gpu, row_starts=starts, **args)
    assert np.array_equal(got, exact), "differs from the reference run on the GPU's own scores"

    qc, kc = q.cpu(), k.cpu()
    cpu = chunkkv.select(qc, kc, row_starts=starts, **args).numpy()
    s_cpu = chunkkv.score(qc, kc, scale=args.get("scale"), row_starts=starts).numpy()
    compare_rows_with_cpu(got, cpu, s_gpu, s_cpu, L, w, args, starts)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("c", [1, 3, 7, 50, 10**9])
def test_select_ties_resolve_to_lower_positions(c, per_head):
    """Zero keys: every logit is 0, all scores tie exactly on both cores; equal results."""
    B, Hkv, G, w, L, D = 2, 2, 3, 3, 40, 8
    rng = np.random.default_rng(c)
    q = torch.from_numpy(rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)).to(DEV)
    k = torch.zeros((B, Hkv, L, D), device=DEV)
    P = L - w
    for budget in (w, w + 1, w + 5, w + 8, w + 9, L - 1):
        Bp = budget - w
        want = np.r_[np.arange(Bp), np.arange(P, L)]
        for method in METHODS:
            got = chunkkv.select(q, k, budget=budget, chunk_size=c, per_head=per_head, method=method).cpu().numpy()
            cpu = chunkkv.select(q.cpu(), k.cpu(), budget=budget, chunk_size=c, per_head=per_head,
                                 method=method).numpy()
            assert np.array_equal(got, cpu), method
            if method == "chunkkv":
                assert np.array_equal(got.reshape(-1, budget), np.broadcast_to(want, (got.size // budget, budget)))


@pytest.mark.parametrize("c", [2, 5, 8])
def test_select_periodic_keys_exact(c):
    """Keys repeating with period c: equal chunk sums (exact ties) resolved to lower chunks."""
    rng = np.random.default_rng(c)
    B, Hkv, G, w, D = 2, 2, 2, 4, 16
    P = 9 * c + 1
    L = P + w
    base = rng.standard_normal((B, Hkv, c, D)).astype(np.float32)
    kn = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    kn[:, :, : 9 * c] = np.tile(base, (1, 1, 9, 1))
    kn[:, :, 9 * c] = base[:, :, 0]
    q = torch.from_numpy(rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)).to(DEV)
    k = torch.from_numpy(kn).to(DEV)
    s = np_of(chunkkv.score(q, k))
    assert np.array_equal(s[..., : 8 * c], s[..., c: 9 * c]), "premise: equal keys, equal scores"
    for per_head in (False, True):
        for Bp in (c, 3 * c, 3 * c + 1, 5 * c - 1):
            got = chunkkv.select(q, k, budget=Bp + w, chunk_size=c, per_head=per_head).cpu().numpy()
            assert np.array_equal(got, ref.select(q.cpu(), k.cpu(), budget=Bp + w, chunk_size=c,
                                                  per_head=per_head, token_scores=s))
            cpu = chunkkv.select(q.cpu(), k.cpu(), budget=Bp + w, chunk_size=c, per_head=per_head).numpy()
            assert np.array_equal(got, cpu)


def test_select_hand_computed_example():
    t = np.array([1, 1, 8, 1, 6, 1, 1, 1, 2, 2, 1], dtype=np.float32)
    q = torch.ones((1, 1, 1, 1), device=DEV)
    k = torch.from_numpy(np.log(t).reshape(1, 1, -1, 1).astype(np.float32)).to(DEV)
    assert chunkkv.select(q, k, budget=6, chunk_size=2, scale=1.0).tolist() == [[2, 3, 4, 5, 8, 10]]
    assert chunkkv.select(q, k, budget=6, method="snapkv", scale=1.0).tolist() == [[0, 2, 4, 8, 9, 10]]


def test_select_random_and_streaming_match_cpu_exactly():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((2, 4, 2, 8)).astype(np.float32)).to(DEV)
    k = torch.from_numpy(rng.standard_normal((2, 2, 100, 8)).astype(np.float32)).to(DEV)
    for seed in (0, 5, 2**63 - 1):
        for ph in (False, True):
            got = chunkkv.select(q, k, budget=30, method="random", seed=seed, per_head=ph).cpu()
            assert torch.equal(got, chunkkv.select(q.cpu(), k.cpu(), budget=30, method="random", seed=seed,
                                                   per_head=ph))
    for n_sink in (0, 3, 40):
        got = chunkkv.select(q, k, budget=30, method="streamingllm", n_sink=n_sink, row_starts=[0, 7]).cpu()
        assert torch.equal(got, chunkkv.select(q.cpu(), k.cpu(), budget=30, method="streamingllm",
                                               n_sink=n_sink, row_starts=[0, 7]))


def test_select_nonfinite_scores_give_a_valid_selection():
    """The CPU raises on non-finite scores; on CUDA (no host sync) the selection stays valid."""
    rng = np.random.default_rng(2)
    qn = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    kn = rng.standard_normal((2, 2, 200, 16)).astype(np.float32)
    kn[0, 1, 50, 3] = np.nan
    q, k = torch.from_numpy(qn).to(DEV), torch.from_numpy(kn).to(DEV)
    with pytest.raises(ValueError, match="finite"):
        chunkkv.select(qn, kn, budget=40)
    for method in ("chunkkv", "snapkv"):
        for ph in (False, True):
            got = chunkkv.select(q, k, budget=40, method=method, per_head=ph).cpu().numpy()
            check_invariants(got, 2, 2, 200, 3, 40, ph, None)


def test_select_large():
    """A long context in bf16 (many chunks, radix passes over thousands of candidates)."""
    rng = np.random.default_rng(9)
    q = make(rng.standard_normal((2, 32, 32, 128)), "bfloat16", "contiguous")
    k = make(rng.standard_normal((2, 8, 32768, 128)), "bfloat16", "bhld_T")
    s = np_of(chunkkv.score(q, k))
    for args in (dict(budget=2048, chunk_size=10), dict(budget=4096, chunk_size=1, per_head=True),
                 dict(budget=1000, method="snapkv", pool_kernel=7), dict(budget=3000, method="random")):
        got = chunkkv.select(q, k, **args).cpu().numpy()
        want = ref.select(np.empty((2, 32, 32, 1)), np.empty((2, 8, 32768, 1)), token_scores=s, **args)
        assert np.array_equal(got, want), args


# ----------------------------------------------------------------------------- h2o, chunkkv-kvpress


def _rank_top(values: np.ndarray, k: int) -> list:
    """The k best positions, ties to the lower position, sorted."""
    return sorted(ref._rank(values)[:k].tolist())


@pytest.mark.parametrize("case", range(24))
def test_h2o_matches_cpu(case):
    """All L prompt queries (row tiles past the causal diagonal are skipped), prefix L - window."""
    rng = np.random.default_rng([905, case])
    B, Hkv, G = int(rng.integers(1, 3)), int(rng.choice([1, 2, 4])), int(rng.choice([1, 2, 4]))
    L, D = int(rng.integers(2, 700)), int(rng.choice([8, 32, 64]))
    window = int(rng.integers(1, min(L, 64) + 1))
    dtype = str(rng.choice(DTYPES))
    q = make(rng.standard_normal((B, Hkv * G, L, D)), dtype, str(rng.choice(LAYOUTS)))
    k = make(rng.standard_normal((B, Hkv, L, D)), dtype, str(rng.choice(LAYOUTS)))
    starts = random_starts(rng, B, L, p=0.3)
    P = L - window
    s_gpu = np_of(chunkkv.score(q, k, prefix=P, row_starts=starts))
    s_cpu = chunkkv.score(q.cpu(), k.cpu(), prefix=P, row_starts=starts).numpy()
    np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-4, atol=1e-30)
    budget = int(rng.integers(window, L + 2))
    for per_head in (False, True):
        args = dict(budget=budget, method="h2o", window=window, per_head=per_head)
        got = chunkkv.select(q, k, row_starts=starts, **args).cpu().numpy()
        check_invariants(got, B, Hkv, L, window, budget, per_head, starts)
        # h2o ranks its raw column sums: the reference's snapkv with max pooling over one token
        as_snap = dict(budget=budget, method="snapkv", pool_kernel=1, pool="max", per_head=per_head)
        fake_q, fake_k = np.empty((B, 1, window, 1)), np.empty((B, Hkv, L, 1))
        exact = ref.select(fake_q, fake_k, token_scores=s_gpu, row_starts=starts, **as_snap)
        assert np.array_equal(got, exact), "differs from the reference run on the GPU's own scores"
        cpu = chunkkv.select(q.cpu(), k.cpu(), row_starts=starts, **args).numpy()
        compare_rows_with_cpu(got, cpu, s_gpu, s_cpu, L, window, as_snap, starts)


def kvpress_from_scores(s: np.ndarray, L: int, w: int, G: int, kernel: int, chunk: int, n: int):
    """The C core's kvpress selection from per-head float32 scores [B, H, P], in its float32 order:
    (indices [B, n], chunk means [B, chunks], n_keep)."""
    B, H, P = s.shape
    half = kernel // 2
    norm = np.float32(1.0) / (np.float32(w) * np.float32(G))
    acc = np.zeros((B, H, P), np.float32)
    for o in range(-half, half + 1):  # neighbours in ascending order; missing ones add exactly 0
        shifted = np.zeros((B, H, P), np.float32)
        lo, hi = max(0, -o), min(P, P - o)
        if lo < hi:
            shifted[..., lo:hi] = s[..., lo + o:hi + o] * norm
        acc = acc + shifted
    pooled = acc / np.float32(kernel)
    window = ((pooled.max() if P > 0 else np.float32(0)) + np.float32(1)) * np.float32(H)
    tokens = np.full((B, L), window, np.float32)
    tok = np.zeros((B, P), np.float32)
    for g in range(H):
        tok = tok + pooled[:, g]
    tokens[:, :P] = tok
    c = min(chunk, L)
    n_keep = n // chunk + (n % chunk != 0)
    out = np.full((B, n), -1, np.int64)
    means = []
    for b in range(B):
        sums = ref._chunk_sums(tokens[b].astype(np.float64), c)
        sizes = np.array([min((m + 1) * c, L) - m * c for m in range(len(sums))], np.float64)
        means.append(sums / sizes)
        best = _rank_top(means[-1], n_keep)
        kept = [j for m in best for j in range(m * c, min((m + 1) * c, L))]
        out[b, : len(kept)] = kept[:n]
    return out, np.array(means), n_keep


@pytest.mark.parametrize("case", range(30))
def test_chunkkv_kvpress_matches_cpu(case):
    rng = np.random.default_rng([906, case])
    B, Hkv, G, D, L, w = random_shape(rng, cost=6e5)
    q, k = random_qk(rng, B, Hkv, G, D, L, w)
    chunk = int(rng.choice([1, 3, 7, 20, max(L, 1), L + 5]))
    frac = float(rng.choice([0.05, 0.1, 0.3, 0.5, 0.9, 1.0]))
    kernel = int(rng.choice([1, 3, 5, 7]))
    args = dict(budget=0, method="chunkkv-kvpress", chunk_size=chunk, keep_fraction=frac, pool_kernel=kernel)
    got = chunkkv.select(q, k, **args).cpu().numpy()
    n = got.shape[1]
    s_gpu = np_of(chunkkv.score(q, k))
    exact, _, _ = kvpress_from_scores(s_gpu, L, w, G, kernel, chunk, n)
    assert np.array_equal(got, exact), "differs from the CPU's kvpress arithmetic on the GPU's own scores"
    cpu = chunkkv.select(q.cpu(), k.cpu(), **args).numpy()
    if not np.array_equal(got, cpu):  # only a near-tie of chunk means may part them
        s_cpu = chunkkv.score(q.cpu(), k.cpu()).numpy()
        mirror, means, n_keep = kvpress_from_scores(s_cpu, L, w, G, kernel, chunk, n)
        assert np.array_equal(cpu, mirror), "the test's mirror of the CPU arithmetic is off"
        c = min(chunk, L)
        for b in np.nonzero((got != cpu).any(axis=1))[0]:
            chunks_of = lambda row: {int(j) // c for j in row if j >= 0}  # noqa: E731
            gap = ref._top_boundary_gap(means[b], chunks_of(got[b]), chunks_of(cpu[b]), n_keep)
            assert gap <= NEAR_TIE, f"row {b}: GPU and CPU keep other chunks at a relative gap of {gap}"


# ----------------------------------------------------------------------------- gather / compact_


def random_indices(rng, B, H, L, per_head, n, increasing):
    shape = (B, H) if per_head else (B,)
    if increasing:
        idx = np.stack([np.sort(rng.choice(L, size=n, replace=False)) for _ in range(int(np.prod(shape)))])
        return idx.reshape(shape + (n,))
    return rng.integers(0, L, size=shape + (n,))


def cuda_indices(idx: np.ndarray, layout: str):
    t = torch.from_numpy(np.ascontiguousarray(idx)).to(DEV)
    if layout == "step":
        buf = torch.full(idx.shape[:-1] + (2 * idx.shape[-1] + 1,), -7, dtype=torch.int64, device=DEV)
        buf[..., 1::2] = t
        return buf[..., 1::2]
    if layout == "transposed" and idx.ndim == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t


@pytest.mark.parametrize("case", range(80))
def test_gather_matches_reference(case):
    rng = np.random.default_rng([903, case])
    B, H = int(rng.integers(1, 4)), int(rng.choice([1, 2, 3, 8]))
    D = int(rng.choice([1, 3, 8, 16, 24, 64, 128]))
    L = int(rng.integers(1, 30) if rng.random() < 0.4 else rng.integers(30, 2000))
    dtype = str(rng.choice(DTYPES))
    k = make(rng.standard_normal((B, H, L, D)), dtype, str(rng.choice(LAYOUTS)))
    v = make(rng.standard_normal((B, H, L, D)), dtype, str(rng.choice(LAYOUTS)))
    per_head = bool(rng.random() < 0.5)
    n = int(rng.choice([1, L, int(rng.integers(1, L + 1)), L + int(rng.integers(1, 6))]))
    idx_np = random_indices(rng, B, H, L, per_head, n, increasing=False)
    idx = cuda_indices(idx_np, str(rng.choice(["contiguous", "step", "transposed"])))
    want_k, want_v = ref.gather(f64(k), f64(v), idx_np)
    before = [bits(x) for x in (k, v, idx)]
    if rng.random() < 0.5:
        ok, ov = chunkkv.gather(k, v, idx)
        assert ok.is_cuda and ok.dtype == k.dtype and tuple(ok.shape) == (B, H, n, D)
    else:  # strided outputs inside guarded buffers
        bk = torch.full((B + 1, 2 * H, n + 2, 2 * D + 1), -1234.0, dtype=k.dtype, device=DEV)
        bv = torch.full((B + 2, H + 1, 2 * n + 3, D + 5), -1234.0, dtype=k.dtype, device=DEV)
        ok, ov = bk[:B, 1::2, 1:n + 1, 1::2], bv[1:B + 1, :H, 2:2 + 2 * n:2, 3:3 + D]
        mk, mv = torch.zeros_like(bk, dtype=torch.bool), torch.zeros_like(bv, dtype=torch.bool)
        mk[:B, 1::2, 1:n + 1, 1::2] = True
        mv[1:B + 1, :H, 2:2 + 2 * n:2, 3:3 + D] = True
        rk, rv = chunkkv.gather(k, v, idx, out=(ok, ov))
        assert rk is ok and rv is ov
        assert (bk[~mk] == -1234.0).all() and (bv[~mv] == -1234.0).all(), "guard region written"
    assert np.array_equal(f64(ok), want_k) and np.array_equal(f64(ov), want_v)
    assert all(np.array_equal(bits(x), b) for x, b in zip((k, v, idx), before)), "inputs changed"


@pytest.mark.parametrize("case", range(50))
def test_compact_in_place(case):
    rng = np.random.default_rng([904, case])
    B, H = int(rng.integers(1, 4)), int(rng.choice([1, 2, 4, 8]))
    D = int(rng.choice([1, 8, 64, 128, 520]))
    L = int(rng.integers(1, 30) if rng.random() < 0.4 else rng.integers(30, 3000 if D <= 128 else 300))
    dtype = str(rng.choice(DTYPES))
    k = make(rng.standard_normal((B, H, L, D)), dtype, str(rng.choice(["contiguous", "bhld_T", "step", "fortran"])))
    v = make(rng.standard_normal((B, H, L, D)), dtype, "contiguous")
    k64, v64 = f64(k), f64(v)
    per_head = bool(rng.random() < 0.5)
    n = int(rng.choice([1, L, int(rng.integers(1, L + 1))]))
    idx_np = random_indices(rng, B, H, L, per_head, n, increasing=True)
    idx = cuda_indices(idx_np, "contiguous")
    want_k, want_v = ref.gather(k64, v64, idx_np)
    kptr = k.data_ptr()
    ck, cv = chunkkv.compact_(k, v, idx)
    assert ck.data_ptr() == kptr
    assert np.array_equal(f64(ck), want_k) and np.array_equal(f64(cv), want_v)
    assert np.array_equal(f64(k)[:, :, n:], k64[:, :, n:]) and np.array_equal(f64(v)[:, :, n:], v64[:, :, n:])


@pytest.mark.parametrize("case", range(60))
def test_select_from_scores_matches_select_and_cpu(case):
    """select_from_scores on the GPU's own head sums == select on the GPU; == the CPU core on the
    same scores (both exact: the selection logic alone)."""
    rng = np.random.default_rng([905, case])
    B, Hkv, G, D, L, w = random_shape(rng, cost=8e5)
    q, k = random_qk(rng, B, Hkv, G, D, L, w)
    args = random_select_args(rng, L, w)
    if args["method"] not in ("chunkkv", "snapkv"):
        args = dict(budget=args["budget"], per_head=args["per_head"], method="chunkkv")
    per_head, scale = args.pop("per_head"), args.pop("scale", None)
    starts = random_starts(rng, B, L, p=0.3)
    want = chunkkv.select(q, k, per_head=per_head, scale=scale, row_starts=starts, **args)
    s = chunkkv.score(q, k, scale=scale, row_starts=starts)
    S = s if per_head else torch.from_numpy(ref.sum_heads(np_of(s))).to(DEV)
    got = chunkkv.select_from_scores(S, length=L, row_starts=starts, **args)
    assert got.is_cuda and torch.equal(got, want)
    cpu = chunkkv.select_from_scores(S.cpu(), length=L, row_starts=starts, **args)
    assert torch.equal(got.cpu(), cpu)


def test_overlapping_outputs_are_refused_on_cuda():
    """Issue 20: a shifted view of keys as keys_out is refused (before, the in-place kernel ran on it)."""
    buf = torch.randn(1, 2, 9, 4, device=DEV)
    before = buf.clone()
    with pytest.raises(ValueError, match="overlap"):
        chunkkv.gather(buf[:, :, :8], torch.randn(1, 2, 8, 4, device=DEV), torch.tensor([[0, 1, 5]], device=DEV),
                       out=(buf[:, :, 1:4], torch.zeros(1, 2, 3, 4, device=DEV)))
    assert torch.equal(buf, before)


def test_gather_out_of_range_indices_write_zeros():
    """The host cannot check device indices without a sync: out-of-range rows come out as zeros."""
    k = torch.arange(2 * 2 * 10 * 4, dtype=torch.float32, device=DEV).reshape(2, 2, 10, 4) + 1
    idx = torch.tensor([[0, -1, 10, 9], [3, 2**40, 5, -(2**40)]], device=DEV)
    ok, ov = chunkkv.gather(k, k, idx)
    torch.cuda.synchronize()
    for b in range(2):
        for t in range(4):
            i = int(idx[b, t])
            want = k[b, :, i] if 0 <= i < 10 else torch.zeros_like(k[b, :, 0])
            assert torch.equal(ok[b, :, t], want)


def test_compress_end_to_end_bf16():
    rng = np.random.default_rng(4)
    q = make(rng.standard_normal((2, 8, 6, 64)), "bfloat16", "bhld_T")
    k = make(rng.standard_normal((2, 2, 700, 64)), "bfloat16", "bhld_T")
    v = make(rng.standard_normal((2, 2, 700, 64)), "bfloat16", "contiguous")
    for ph in (False, True):
        kk, vv, idx = chunkkv.compress(q, k, v, budget=128, chunk_size=8, per_head=ph)
        s = np_of(chunkkv.score(q, k))
        want = ref.select(f64(q), f64(k), token_scores=s, budget=128, chunk_size=8, per_head=ph)
        assert np.array_equal(idx.cpu().numpy(), want)
        rk, rv = ref.gather(f64(k), f64(v), want)
        assert np.array_equal(f64(kk), rk) and np.array_equal(f64(vv), rv)


# ----------------------------------------------------------------------------- streams, sync, devices


def _sleep_then(fn, stream, cycles=int(2e9)):
    """Queue a long GPU sleep on stream, then fn() on it; (host seconds fn took, stream busy after)."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        busy = not stream.query()
    return out, dt, busy


@pytest.mark.skipif(not hasattr(torch.cuda, "_sleep"), reason="torch.cuda._sleep is not available")
def test_ops_queue_on_the_callers_stream_without_waiting():
    rng = np.random.default_rng(6)
    q = torch.from_numpy(rng.standard_normal((2, 8, 8, 64)).astype(np.float32)).to(DEV)
    k = torch.from_numpy(rng.standard_normal((2, 4, 3000, 64)).astype(np.float32)).to(DEV)
    k2 = torch.from_numpy(rng.standard_normal((2, 4, 3000, 64)).astype(np.float32)).to(DEV)
    v = torch.randn_like(k)
    want_idx = chunkkv.select(q, k2, budget=256, row_starts=[0, 100])  # warm-up and expectation
    want_s = chunkkv.score(q, k2)
    kw, vw = k2.clone(), v.clone()  # warm-up: the outputs' sizes land in torch's allocator cache
    chunkkv.gather(kw, vw, want_idx)
    chunkkv.compact_(kw, vw, want_idx)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())

    def work():
        k.copy_(k2)  # queued after the sleep: an op on another stream would read the old keys
        s = chunkkv.score(q, k)
        idx = chunkkv.select(q, k, budget=256, row_starts=[0, 100])
        kk, vv = chunkkv.gather(k, v, idx)
        kc, vc = chunkkv.compact_(k, v, idx)
        return s, idx, kk, vv

    (s, idx, kk, vv), dt, busy = _sleep_then(work, side)
    assert busy, "the stream finished during the call: something waited for the GPU"
    assert dt < 0.5, f"the ops took {dt:.3f} s on the host behind a ~1 s GPU sleep: something waited"
    side.synchronize()
    assert torch.equal(s, want_s), "scores are deterministic, and ran after the copy on the caller's stream"
    assert torch.equal(idx, want_idx)
    assert torch.equal(kk, k[:, :, :256]) and torch.equal(kk, torch.gather(
        k2, 2, want_idx[:, None, :, None].expand(2, 4, 256, 64)))


@pytest.mark.skipif(not hasattr(torch.cuda, "_sleep"), reason="torch.cuda._sleep is not available")
def test_kvpress_waits_only_when_a_row_can_pad():
    """chunkkv-kvpress trims its padding on the host (the output's width depends on the selection): only when
    a row can keep the short last chunk. With L a multiple of chunk_size nothing waits for the GPU."""
    rng = np.random.default_rng(9)
    q = torch.from_numpy(rng.standard_normal((2, 8, 8, 64)).astype(np.float32)).to(DEV)
    k = torch.from_numpy(rng.standard_normal((2, 4, 3000, 64)).astype(np.float32)).to(DEV)
    args = dict(budget=0, method="chunkkv-kvpress", chunk_size=10, keep_fraction=0.2)
    want = chunkkv.select(q.cpu(), k.cpu(), **args)
    chunkkv.select(q, k, **args)  # warm-up
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    idx, dt, busy = _sleep_then(lambda: chunkkv.select(q, k, **args), side)
    assert busy and dt < 0.5, f"L % chunk_size == 0: the select waited ({dt:.3f} s on the host)"
    side.synchronize()
    assert np.array_equal(idx.cpu().numpy(), want.numpy()) or (idx.cpu().numpy() == want.numpy()).mean() > 0.9
    k_odd = k[:1, :, :2995]  # 299 chunks of 10 and one of 5, which the row may keep: then the host trims
    n = int(chunkkv.ops._C.select_count(5, 0, 10, 0.2, 2995))
    got = chunkkv.select(q[:1], k_odd, **args)
    assert got.shape[1] in (n, n - 5) and (got >= 0).all()
    assert (got[:, -1] == 2994).item() == (got.shape[1] == n - 5), "the short chunk is kept iff the row is trimmed"


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


def test_cupy_producer_orders_its_stream_before_the_kernels():
    """A CuPy producer on a non-blocking stream of its own: chunkkv passes its stream (torch's current one,
    the legacy default here, as 1) to CuPy's __dlpack__, which makes it wait for CuPy's pending writes.
    Without that exchange the kernels would read the keys before CuPy's delayed copy wrote them."""
    cp = pytest.importorskip("cupy")
    rng = np.random.default_rng(10)
    kn = rng.standard_normal((2, 4, 1000, 32)).astype(np.float32)
    vn = rng.standard_normal((2, 4, 1000, 32)).astype(np.float32)
    idx_n = np.sort(np.stack([rng.choice(1000, 100, replace=False) for _ in range(2)]), -1)
    want_k, want_v = ref.gather(kn.astype(np.float64), vn.astype(np.float64), idx_n)
    spin = cp.RawKernel(_SPIN, "spin")
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        src_k, src_v, idx = cp.asarray(kn), cp.asarray(vn), cp.asarray(idx_n)
        stream.synchronize()
        k, v = cp.zeros_like(src_k), cp.zeros_like(src_v)
        spin((1,), (1,), (np.int64(int(1e9)),))  # ~0.5 s of GPU time before the keys are written
        k[...] = src_k
        v[...] = src_v
        ck, cv = chunkkv.compact_(k, v, idx)  # CuPy's current stream is `stream` here
    torch.cuda.synchronize()
    stream.synchronize()
    assert np.array_equal(cp.asnumpy(ck).astype(np.float64), want_k), "read the keys before CuPy wrote them"
    assert np.array_equal(cp.asnumpy(cv).astype(np.float64), want_v)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    rng = np.random.default_rng(8)
    dev1 = torch.device("cuda", 1)
    qn = rng.standard_normal((2, 4, 4, 32)).astype(np.float32)
    kn = rng.standard_normal((2, 2, 500, 32)).astype(np.float32)
    torch.cuda.set_device(0)
    q, k = torch.from_numpy(qn).to(dev1), torch.from_numpy(kn).to(dev1)
    idx = chunkkv.select(q, k, budget=64)
    assert idx.device == dev1 and torch.cuda.current_device() == 0
    s = np_of(chunkkv.score(q, k))
    assert np.array_equal(idx.cpu().numpy(), ref.select(qn, kn, budget=64, token_scores=s))
    kk, _ = chunkkv.gather(k, k, idx)
    assert torch.equal(kk.cpu(), torch.from_numpy(ref.gather(kn, kn, idx.cpu().numpy())[0]))
    assert torch.cuda.current_device() == 0
