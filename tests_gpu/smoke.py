"""Every CUDA kernel once on small inputs, then a sync: for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests_gpu/smoke.py
Prints "smoke: ok" when every result matches the CPU core.
"""
from __future__ import annotations

import numpy as np
import torch

import chunkkv


def main() -> None:
    assert chunkkv.build_info()["cuda"], "chunkkv was built without CUDA"
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    B, Hkv, G, w, L, D = 2, 2, 3, 5, 300, 24
    qn = rng.standard_normal((B, Hkv * G, w, D)).astype(np.float32)
    kn = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    vn = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    q, k, v = (torch.from_numpy(x).to(dev) for x in (qn, kn, vn))
    kb = k.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)  # strided bf16
    starts = [0, 37]

    s = chunkkv.score(q, kb, row_starts=starts)
    s_cpu = chunkkv.score(qn, kb.cpu(), row_starts=starts)
    np.testing.assert_allclose(s.cpu().numpy(), s_cpu.numpy(), rtol=1e-4, atol=1e-30)
    for method, extra in [("chunkkv", dict(chunk_size=7)), ("chunkkv", dict(chunk_size=1, per_head=True)),
                          ("snapkv", dict(pool_kernel=5)), ("streamingllm", {}), ("random", dict(seed=3))]:
        got = chunkkv.select(q, k, budget=60, row_starts=starts, **extra)
        want = chunkkv.select(qn, kn, budget=60, row_starts=starts, **extra)
        assert got.shape == tuple(want.shape)
        assert (got.cpu().numpy() == want).mean() > 0.9, method  # near-ties aside
    qa = torch.from_numpy(rng.standard_normal((B, Hkv * G, L, D)).astype(np.float32)).to(dev)  # h2o: all queries
    got = chunkkv.select(qa, k, budget=80, method="h2o", window=16)
    assert got.shape == (B, 80)
    got = chunkkv.select(q, k, budget=0, method="chunkkv-kvpress", chunk_size=10, keep_fraction=0.3, pool_kernel=5)
    want = chunkkv.select(qn, kn, budget=0, method="chunkkv-kvpress", chunk_size=10, keep_fraction=0.3,
                          pool_kernel=5)
    assert np.array_equal(got.cpu().numpy(), want)

    idx = chunkkv.select(q, k, budget=64, per_head=True)
    kk, vv = chunkkv.gather(kb, v, idx)
    rk, rv = chunkkv.gather(kb.cpu(), vn, idx.cpu())
    assert torch.equal(kk.cpu(), rk) and np.array_equal(vv.cpu().numpy(), rv)
    k2, v2 = kb.clone(), v.clone()
    ck, cv = chunkkv.compact_(k2, v2, idx)
    assert torch.equal(ck.cpu(), rk) and np.array_equal(cv.cpu().numpy(), rv)
    torch.cuda.synchronize()
    print("smoke: ok")


if __name__ == "__main__":
    main()
