"""A small tour of every chunkkv entry point, for tests/valgrind_smoke.sh (NumPy only: fast to start).

Each op runs on a few layouts and dtypes, on empty and edge shapes, and on inputs it refuses, so
memcheck sees the success paths, the error paths and the OpenMP paths of the C core.
"""
from __future__ import annotations

import numpy as np

import chunkkv

rng = np.random.default_rng(0)
calls = errors = 0


def run(fn, *args, **kwargs):
    global calls, errors
    calls += 1
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError, BufferError, MemoryError):
        errors += 1
        return None


def main() -> None:
    for threads in (1, 3):
        chunkkv.set_num_threads(threads)
        for dtype in ("float32", "float16"):
            B, Hkv, G, w, L, D = 2, 2, 2, 3, 37, 8
            q = rng.standard_normal((B, Hkv * G, w, D)).astype(dtype)
            k = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
            v = rng.standard_normal((B, Hkv, L, D)).astype(dtype)
            layouts = [k, np.ascontiguousarray(k[:, :, ::-1])[:, :, ::-1], k.swapaxes(1, 2).copy().swapaxes(1, 2)]
            for kk in layouts:
                for method, extra in (("chunkkv", {"chunk_size": 4}), ("snapkv", {"pool_kernel": 3}),
                                      ("streamingllm", {"n_sink": 2}), ("random", {"seed": 1})):
                    for per_head in (False, True):
                        idx = run(chunkkv.select, q, kk, budget=12, method=method, per_head=per_head,
                                  row_starts=[0, 5], **extra)
                        if idx is not None:
                            run(chunkkv.gather, kk, v, idx)
                run(chunkkv.score, q, kk, row_starts=[3, 0])
                run(chunkkv.compress, q, kk, v, budget=20)
                idx = run(chunkkv.select, q, kk, budget=12)
                run(chunkkv.compact_, kk.copy(), v.copy(), idx)
            # edge shapes: empty batch, window = L, budget >= L, D = 0 gather
            run(chunkkv.select, q[:0], k[:0], budget=5)
            run(chunkkv.select, k[:, :, :5].repeat(2, axis=1), k[:, :, :5], budget=5)
            run(chunkkv.select, q, k, budget=1000)
            run(chunkkv.gather, k[..., :0], v[..., :0], np.zeros((B, 3), np.int64))
            # refusals at every stage
            run(chunkkv.select, q.astype(np.float64), k, budget=12)
            run(chunkkv.select, q, k, budget=1)
            run(chunkkv.select, q, k, budget=12, row_starts=[0, 99])
            bad = q.copy()
            bad[0, 0, 0, 0] = np.nan
            run(chunkkv.select, bad, k, budget=12)
            run(chunkkv.gather, k, v, np.full((B, 3), L, np.int64))
            run(chunkkv.compact_, k.copy(), v.copy(), np.array([[3, 2], [1, 0]], np.int64))
            misaligned = np.ndarray(k.shape, k.dtype, np.zeros(k.nbytes + 8, np.uint8), offset=1)
            run(chunkkv.gather, k, misaligned, np.zeros((B, 2), np.int64))
            run(chunkkv.score, q, np.broadcast_to(k[:, :, :1], (B, Hkv, 2**31, D)))
            run(chunkkv.gather, k, v, np.zeros((B, 2), np.int64), out=(np.zeros((B, Hkv, 2, D), dtype),) * 2)
    chunkkv.set_num_threads(0)
    print(f"valgrind smoke: {calls} calls, {errors} refused as expected")


if __name__ == "__main__":
    main()
