"""Every CUDA kernel once on small inputs, each result against the CPU core: for compute-sanitizer.

    compute-sanitizer --tool memcheck --kernel-name kns=ckv --error-exitcode 9 python3 tests_gpu/smoke.py

Covers scoring (with left padding), every selection method (chunkkv, per-head, snapkv, streamingllm,
random, h2o, chunkkv-kvpress), and gather / compact_ in each copy width the kernels pick (16, 8, 4 bytes
and single elements) with shared and per-head indices. Prints "smoke: ok" when every result matches.
It imports the chunkkv of this checkout (an in-place build) before an installed one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

T0 = time.perf_counter()

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script, sys.path[0] is tests_gpu/: a build_ext --inplace lives in ROOT
try:
    import chunkkv
except ImportError:  # the checkout has no built extension: an installed chunkkv
    sys.path.remove(str(ROOT))
    for name in [m for m in sys.modules if m == "chunkkv" or m.startswith("chunkkv.")]:
        del sys.modules[name]
    import chunkkv

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (dtype, D, layout): bf16 D 24 rows are 48 bytes (16-byte units); fp16 D 4: 8 bytes; fp32 D 3: 4-byte
# elements; bf16 D 3: 6 bytes, single elements; "bhld_T" keeps D unit-stride, "strided_d" does not
GATHER_CASES = [(torch.bfloat16, 24, "bhld_T"), (torch.float16, 4, "contiguous"), (torch.float32, 3, "bhld_T"),
                (torch.bfloat16, 3, "contiguous"), (torch.float32, 8, "strided_d")]


def progress(what: str) -> None:
    """A line per stage: a run cut short (a sanitizer's time box) still shows how far it got."""
    print(f"smoke: {what} ({time.perf_counter() - T0:.1f} s)", flush=True)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x [B, H, L, D] with the same values in another memory layout."""
    if layout == "bhld_T":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided_d":
        buf = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype, device=x.device)
        buf[..., ::2] = x
        return buf[..., ::2]
    return x.contiguous()


def check_select(rng: np.random.Generator, dev: torch.device) -> None:
    B, Hkv, G, w, L, D = 2, 2, 3, 5, 300, 24
    qn = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    kn = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    q, k = torch.from_numpy(qn).to(dev), torch.from_numpy(kn).to(dev)
    kb = laid_out(k.to(torch.bfloat16), "bhld_T")  # strided bf16 keys
    starts = [0, 37]
    s = chunkkv.score(q, kb, row_starts=starts)
    s_cpu = chunkkv.score(qn, kb.cpu(), row_starts=starts)
    np.testing.assert_allclose(s.cpu().numpy(), s_cpu.numpy(), rtol=1e-4, atol=1e-30)
    progress("score ok")
    for method, extra in [("chunkkv", dict(chunk_size=7)), ("chunkkv", dict(chunk_size=1, per_head=True)),
                          ("snapkv", dict(pool_kernel=5)), ("streamingllm", {}), ("random", dict(seed=3))]:
        got = chunkkv.select(q, k, budget=60, row_starts=starts, method=method, **extra)
        want = chunkkv.select(qn, kn, budget=60, row_starts=starts, method=method, **extra)
        assert got.shape == tuple(want.shape), method
        assert (got.cpu().numpy() == want).mean() > 0.9, method  # near-ties aside
        progress(f"select {method} {extra} ok")
    got = chunkkv.select(q.to(torch.float16), kb, budget=60, chunk_size=10)  # fp16 queries, bf16 keys
    assert got.shape == (B, 60)
    qa = torch.from_numpy(rng.standard_normal((B, Hkv * G, L, D)).astype(np.float32)).to(dev)  # h2o: all queries
    got = chunkkv.select(qa, k, budget=80, method="h2o", window=16)
    assert got.shape == (B, 80)
    kvpress = dict(budget=0, method="chunkkv-kvpress", chunk_size=10, keep_fraction=0.3, pool_kernel=5)
    assert np.array_equal(chunkkv.select(q, k, **kvpress).cpu().numpy(), chunkkv.select(qn, kn, **kvpress))
    progress("select fp16/bf16, h2o, chunkkv-kvpress ok")


def check_gather(rng: np.random.Generator, dev: torch.device) -> None:
    B, Hkv, L, n = 2, 2, 200, 64
    for dtype, D, layout in GATHER_CASES:
        k = laid_out(torch.from_numpy(rng.standard_normal((B, Hkv, L, D))).to(dev, dtype), layout)
        v = laid_out(torch.from_numpy(rng.standard_normal((B, Hkv, L, D))).to(dev, dtype), layout)
        per_head = np.sort(np.stack([[rng.choice(L, n, replace=False) for _ in range(Hkv)] for _ in range(B)]), -1)
        for idx_np in (per_head, per_head[:, 0]):  # [B, Hkv, n] and [B, n] shared by the heads
            idx = torch.from_numpy(np.ascontiguousarray(idx_np)).to(dev)
            want_k, want_v = chunkkv.gather(k.cpu(), v.cpu(), idx.cpu())
            kk, vv = chunkkv.gather(k, v, idx)
            assert torch.equal(kk.cpu(), want_k) and torch.equal(vv.cpu(), want_v), (dtype, D, layout, "gather")
            k2, v2 = k.clone(), v.clone()  # dense layouts keep their strides (preserve_format)
            ck, cv = chunkkv.compact_(k2, v2, idx)
            assert ck.data_ptr() == k2.data_ptr()
            assert torch.equal(ck.cpu(), want_k) and torch.equal(cv.cpu(), want_v), (dtype, D, layout, "compact_")
            assert torch.equal(k2[:, :, n:], k[:, :, n:]), "compact_ wrote past n"
        progress(f"gather, compact_ {dtype} D={D} {layout} ok")


def main(argv: list[str]) -> None:
    """--device cpu runs the same calls on the CPU (the GPU check's dry run: the script itself is sound)."""
    dev = torch.device(argv[argv.index("--device") + 1] if "--device" in argv else "cuda")
    if dev.type == "cuda":
        assert chunkkv.build_info()["cuda"], "chunkkv was built without CUDA"
        torch.zeros(1, device=dev)
        progress(f"torch {torch.__version__} on {torch.cuda.get_device_name(dev)} ready")
    rng = np.random.default_rng(0)
    check_select(rng, dev)
    check_gather(rng, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"smoke: ok ({dev.type}) in {time.perf_counter() - T0:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
