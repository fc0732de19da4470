#!/usr/bin/env python3
"""Speed of one layer's compression (select + gather) and of generation with a compressed cache.

Kernels, on the same tensors, in one run (ratios are what count on a noisy machine):
  chunkkv    the C core (chunkkv.compress)
  torch_ref  the same algorithm as vectorised PyTorch (chunkkv/eval/torch_ref.py)
  kvpress    kvpress's ChunkKVPress(SnapKVPress(compression_ratio=0.9)).compress in its own venv
             (--kvpress-venv; its query projection, timed apart, is subtracted), else null
and the per-layer cost with reuse=2 (a leader selects and gathers, a follower only gathers).
The machine's limits are measured in the same run, with the same thread count: memory bandwidth (a
large torch copy), the fp32 FMA peak (chunkkv.ops.fma_peak_gflops: independent FMAs in registers at the
widest vector width, the true ceiling) and, for reference, a large torch fp32 matmul (which can run below
the FMA peak, e.g. when the BLAS takes a narrower code path on this CPU).

End to end with SmolLM2-135M-Instruct (skipped with --no-e2e): prefill time with and without
compression, decode tokens per second, and KV memory (full, after compression, peak during prefill);
with --kvpress-venv also kvpress's ChunkKV and a full cache in kvpress's own environment.

    chunkkv-eval speed --json benchmarks/results/speed.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import chunkkv

from . import torch_ref
from .harness import RESULTS_DIR

HERE = Path(__file__).resolve().parent  # the kvpress worker scripts lie beside this file

HQ, HKV, D, WINDOW, CHUNK = 32, 8, 128, 32, 10  # Llama-3-8B attention, the paper's window and chunk


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine_limits(threads: int) -> dict:
    """Best-of copy bandwidth (GB/s, read + write), fp32 FMA peak and torch matmul rate (GFLOP/s), measured here."""
    torch.set_num_threads(threads)
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    bw = max(2 * src.numel() * 4 / (median_ms(lambda: dst.copy_(src), 1, 1) / 1e3) / 1e9 for _ in range(10))
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    flops = max(2 * n**3 / (median_ms(lambda: torch.mm(a, b), 1, 1) / 1e3) / 1e9 for _ in range(5))
    peak = max(chunkkv.ops.fma_peak_gflops(threads, 0.3) for _ in range(3))
    return {"bandwidth_gbs": bw, "fp32_gflops": peak, "matmul_gflops": flops}


def kernel_cases(lengths, dtypes, reps, threads, kvpress_python):
    rows = []
    for L in lengths:
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            g = torch.Generator().manual_seed(L)
            q = torch.randn(1, HQ, WINDOW, D, generator=g).to(dt)
            k = torch.randn(1, HKV, L, D, generator=g).to(dt)
            v = torch.randn(1, HKV, L, D, generator=g).to(dt)
            budget = L // 10
            item = k.element_size()
            chunkkv_ms = median_ms(lambda: chunkkv.compress(q, k, v, budget=budget, chunk_size=CHUNK), reps)
            idx = chunkkv.select(q, k, budget=budget, chunk_size=CHUNK)
            score_ms = median_ms(lambda: chunkkv.score(q, k), reps)
            gather_ms = median_ms(lambda: chunkkv.gather(k, v, idx), reps)
            ref_ms = median_ms(lambda: torch_ref.compress(q, k, v, budget, CHUNK), max(3, reps // 2))
            reuse2 = (chunkkv_ms + gather_ms) / 2
            flops = 2 * HQ * WINDOW * L * D
            score_bytes = HKV * L * D * item
            gather_bytes = 2 * 2 * HKV * budget * D * item  # read + write, keys and values
            rows.append({"L": L, "dtype": dtype, "threads": threads, "budget": budget,
                         "chunkkv_ms": chunkkv_ms, "torch_ref_ms": ref_ms, "kvpress_ms": None,
                         "reuse2_ms_per_layer": reuse2, "score_ms": score_ms, "gather_ms": gather_ms,
                         "bytes_moved": score_bytes + gather_bytes, "flops": flops,
                         "score_gflops": flops / score_ms / 1e6, "gather_gbs": gather_bytes / gather_ms / 1e6})
            print(f"L={L:6d} {dtype:9s} chunkkv {chunkkv_ms:8.2f} ms  torch_ref {ref_ms:8.2f} ms  "
                  f"reuse2/layer {reuse2:7.2f} ms  score {rows[-1]['score_gflops']:6.1f} GFLOP/s", flush=True)
            if kvpress_python:
                rows[-1]["kvpress_ms"] = kvpress_time(kvpress_python, q, k, v, reps)
                print(f"    kvpress {rows[-1]['kvpress_ms']:8.2f} ms", flush=True)
    return rows


def gather_bandwidth(reps: int) -> float:
    """GB/s (read + write) of chunkkv.gather keeping every other token of a 32k-token fp32 layer into
    preallocated buffers (out=): large enough that the copy, not the call, is what is timed, and no
    first-touch page faults of fresh outputs (the copy bandwidth above is measured the same way)."""
    k = torch.randn(1, HKV, 32768, D)
    v = torch.randn(1, HKV, 32768, D)
    idx = torch.arange(0, 32768, 2).unsqueeze(0)
    out = (torch.empty(1, HKV, 16384, D), torch.empty(1, HKV, 16384, D))
    moved = 2 * 2 * out[0].numel() * 4
    return moved / (median_ms(lambda: chunkkv.gather(k, v, idx, out=out), reps) / 1e3) / 1e9


def kvpress_time(python: Path, q, k, v, reps: int):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kv.pt"
        torch.save({"k": k, "v": v, "reps": reps}, path)
        r = subprocess.run([str(python), str(HERE / "_kvpress_speed_worker.py"), str(path)], capture_output=True,
                           text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])["compress_ms"]


def kvpress_e2e(python: Path, prompts: list[list[int]], new_tokens: int, ratio: float, threads: int,
                repeats: int) -> list[dict]:
    """The same prompts through kvpress (ChunkKVPress(SnapKVPress), chunk 10) and its own full cache, in its venv."""
    from chunkkv.models import smollm2_gguf_path

    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"gguf": smollm2_gguf_path(), "prompts": prompts, "new_tokens": new_tokens,
                                   "ratio": ratio, "threads": threads, "repeats": repeats}))
        r = subprocess.run([str(python), str(HERE / "_kvpress_e2e_worker.py"), str(job)], capture_output=True,
                           text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return []
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    for row in rows:
        print(f"e2e {row['prompt_tokens']:5d} tokens {row['cache']:12s} prefill {row['prefill_s']:6.2f} s  decode "
              f"{row['decode_tok_s']:6.1f} tok/s  KV {row['kv_bytes_after_prefill'] / 2**20:7.1f} MiB", flush=True)
    return rows


def e2e(lengths, new_tokens: int, ratio: float, kvpress_python: Path | None = None, threads: int = 1,
        repeats: int = 3) -> list[dict]:
    """Prefill (median of `repeats`, full and compressed alternating, so a busy spell hits both alike), then
    decode `new_tokens` greedily once; KV bytes after prefill and at their peak during it."""
    from transformers import DynamicCache

    from chunkkv.__main__ import haystack_prompt
    from chunkkv.models import load_smollm2

    model, tok = load_smollm2(attn_implementation="sdpa")

    def run(ids, name: str, decode: bool) -> dict:
        handle = chunkkv.patch(model, keep_ratio=ratio) if name == "chunkkv" else None
        peak = {"bytes": 0, "before": 0}
        cache = DynamicCache(config=model.config)

        def held() -> int:
            return sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers
                       if getattr(l, "keys", None) is not None and l.keys.ndim == 4)

        def before(*_):  # after the layer's attention, before chunkkv compresses it (runs first)
            peak["before"] = held()
            peak["bytes"] = max(peak["bytes"], peak["before"])

        def after(module, *_):  # the kept copy existed beside the full layer until the swap
            layer = cache.layers[module.layer_idx]
            kept = layer.keys.numel() * layer.keys.element_size() * 2 if handle else 0
            peak["bytes"] = max(peak["bytes"], peak["before"] + kept)

        hooks = [h for layer in model.model.layers for h in (
            layer.self_attn.register_forward_hook(before, prepend=True),
            layer.self_attn.register_forward_hook(after))]
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                logits = model(ids, **{chunkkv.cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
                prefill = time.perf_counter() - t0
                for h in hooks:  # decode is timed without them; the finally below covers an error
                    h.remove()
                kv_after = held()
                decode_s = float("nan")
                if decode:
                    tokn = logits.argmax(-1, keepdim=True)
                    t0 = time.perf_counter()
                    for _ in range(new_tokens):
                        tokn = model(tokn, **{chunkkv.cache_kwarg(model): cache}, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                    decode_s = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
            if handle:
                handle.remove()
        return {"prompt_tokens": int(ids.shape[1]), "cache": name, "prefill_s": prefill,
                "decode_tok_s": new_tokens / decode_s, "kv_bytes_after_prefill": kv_after,
                "kv_bytes_peak_prefill": peak["bytes"], "keep_ratio": ratio if handle else 1.0}

    rows, prompts = [], []
    for n in lengths:
        ids = tok(haystack_prompt(tok, n, 0.5, 12345), return_tensors="pt").input_ids
        prompts.append(ids[0].tolist())
        runs = {"full": [], "chunkkv": []}
        for rep in range(repeats):
            for name in runs:
                runs[name].append(run(ids, name, decode=rep == repeats - 1))
        for name, rs in runs.items():
            row = dict(rs[-1], prefill_s=statistics.median(r["prefill_s"] for r in rs),
                       prefill_runs_s=[r["prefill_s"] for r in rs])
            rows.append(row)
            print(f"e2e {ids.shape[1]:5d} tokens {name:8s} prefill {row['prefill_s']:6.2f} s (median of {repeats})  "
                  f"decode {row['decode_tok_s']:6.1f} tok/s  KV {row['kv_bytes_after_prefill'] / 2**20:7.1f} MiB "
                  f"(peak in prefill {row['kv_bytes_peak_prefill'] / 2**20:7.1f} MiB)", flush=True)
    if kvpress_python:
        rows += kvpress_e2e(kvpress_python, prompts, new_tokens, ratio, threads, repeats)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="chunkkv-eval speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "speed.json",
                   help=f"results file (default {RESULTS_DIR / 'speed.json'})")
    p.add_argument("--quick", action="store_true", help="L in 4k, 8k; few repetitions; e2e at 1k only")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--kvpress-venv", type=Path, default=None, help="venv with kvpress (see parity_kvpress.py)")
    p.add_argument("--no-e2e", action="store_true")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    chunkkv.set_num_threads(args.threads)
    lengths = [4096, 8192] if args.quick else [4096, 8192, 16384, 32768]
    reps = 3 if args.quick else 9
    kv_python = args.kvpress_venv / "bin" / "python" if args.kvpress_venv else None
    if kv_python and not kv_python.exists():
        sys.exit(f"no python in {args.kvpress_venv}")
    limits = machine_limits(args.threads)
    print(f"machine: {limits['bandwidth_gbs']:.1f} GB/s copy, {limits['fp32_gflops']:.1f} GFLOP/s fp32 FMA peak "
          f"({limits['matmul_gflops']:.1f} GFLOP/s torch fp32 matmul), {args.threads} threads", flush=True)
    cases = kernel_cases(lengths, ["float32", "bfloat16"], reps, args.threads, kv_python)
    # the limits again after the kernels: a busy spell on a shared machine must not lower them (best of both)
    again = machine_limits(args.threads)
    for key in ("bandwidth_gbs", "fp32_gflops", "matmul_gflops"):
        limits[key] = max(limits[key], again[key])
    print(f"machine, best of start and end: {limits['bandwidth_gbs']:.1f} GB/s copy, {limits['fp32_gflops']:.1f} "
          f"GFLOP/s fp32 FMA peak ({limits['matmul_gflops']:.1f} GFLOP/s torch fp32 matmul)", flush=True)
    limits["gather_gbs"] = gather_bandwidth(reps)
    print(f"gather of half of a 32k-token layer: {limits['gather_gbs']:.1f} GB/s "
          f"({100 * limits['gather_gbs'] / limits['bandwidth_gbs']:.0f}% of the copy bandwidth)", flush=True)
    e2e_rows = [] if args.no_e2e else e2e([1000] if args.quick else [2048, 4096, 8192], 8 if args.quick else
                                        args.new_tokens, 0.1, kv_python, args.threads, 1 if args.quick else 3)
    result = {"machine": {**limits, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                          "simd": chunkkv.build_info()["simd"], "torch": torch.__version__},
              "quick": args.quick, "cases": cases, "e2e": e2e_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\n{'L':>6} {'dtype':9} {'chunkkv ms':>10} {'vs torch':>8} {'vs kvpress':>10} {'reuse2':>7} "
          f"{'score %peak':>11} {'gather %bw':>10}")
    for c in cases:
        kvr = f"{c['kvpress_ms'] / c['chunkkv_ms']:9.1f}x" if c["kvpress_ms"] else "      n/a"
        print(f"{c['L']:6d} {c['dtype']:9} {c['chunkkv_ms']:10.2f} {c['torch_ref_ms'] / c['chunkkv_ms']:7.1f}x "
              f"{kvr:>10} {c['reuse2_ms_per_layer'] / c['chunkkv_ms']:6.2f}x "
              f"{100 * c['score_gflops'] / limits['fp32_gflops']:10.0f}% "
              f"{100 * c['gather_gbs'] / limits['bandwidth_gbs']:9.0f}%")
    print("(gather %bw of a 10% budget is a small copy, dominated by call overhead; see the 32k gather line above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
