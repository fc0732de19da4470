"""CUDA timings of chunkkv's score, select, gather and compact_ beside the same algorithm in PyTorch on the GPU,
with the card's two ceilings (device copy bandwidth, bf16 matrix rate) measured in the same run.

    python3 tools/cuda_timing.py [--out DIR] [--budget-s 100]   # on a GPU machine, after a CUDA build
    python3 tools/cuda_timing.py --dry-run [--out DIR]          # CPU, tiny shapes: the script's own logic (CI)

Shapes: B 1, Hq 32, Hkv 8, D 128, w 32, L = 8k, 32k, 128k, bf16 then fp16; budget L/10, chunk 10 (the
paper's rule). Method (the device README's METHOD.md): warm-up first; CUDA events around each call; the
median of several calls; inputs rotated among copies when one set would sit in L2; random normal data,
never zeros. Each op also gets the fewest bytes it must move and its matrix FLOPs, the floor those give at
the measured ceilings (max of bytes / bandwidth and FLOPs / matrix rate) and time / floor, and is checked
once against the torch version: scores by relative error, indices by the fraction equal (near-ties aside),
gather and compact_ bit for bit.

Every record is appended to DIR/timing.jsonl as soon as it is measured (one JSON object a line: "env",
"ceiling", "op", "skipped" or "error"); the table goes to stdout. Exit status 1 when a check failed or a
case raised (the other cases still run).
The torch algorithm is a copy of benchmarks/torch_ref.py's select (kept here so that this script imports
nothing from benchmarks/), with its scoring half split out as torch_scores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's chunkkv (pip install -e or build_ext --inplace) first

import torch  # noqa: E402

import chunkkv  # noqa: E402

FULL = dict(B=1, Hq=32, Hkv=8, D=128, w=32, lengths=(8192, 32768, 131072), dtypes=("bfloat16", "float16"),
            copy_bytes=1 << 30, matmul_n=8192)
DRY = dict(B=1, Hq=4, Hkv=2, D=16, w=8, lengths=(256, 640), dtypes=("bfloat16", "float16"),
           copy_bytes=8 << 20, matmul_n=256)
CHUNK = 10
OPS = ("score", "select", "gather", "compact_")


# ----------------------------------------------------------------------------- the algorithm in PyTorch


def torch_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """chunkkv.score in PyTorch: [B, Hkv, P] float32, each KV head's summed causal window attention."""
    B, Hq, w, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, L - w
    logits = torch.matmul(q.reshape(B, Hkv, G * w, D).float(), k.float().transpose(-1, -2)) * D ** -0.5
    i = torch.arange(w, device=k.device).repeat(G)
    visible = torch.arange(L, device=k.device)[None, :] <= (P + i)[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return probs[..., :P].sum(dim=2)


def torch_select(q: torch.Tensor, k: torch.Tensor, budget: int, chunk_size: int = CHUNK) -> torch.Tensor:
    """Kept positions [B, budget] by the paper's rule (benchmarks/torch_ref.py's select)."""
    B, Hq, w, D = q.shape
    L = k.shape[2]
    P, c = L - w, chunk_size
    if budget >= L:
        return torch.arange(L, device=k.device).expand(B, L)
    s = torch_scores(q, k).sum(dim=1)                                                   # [B, P]
    n_chunks = -(-P // c)
    padded = torch.nn.functional.pad(s, (0, n_chunks * c - P))
    chunk_scores = padded.view(B, n_chunks, c).double().sum(-1)
    sizes = torch.full((n_chunks,), c, device=k.device)
    sizes[-1] = P - (n_chunks - 1) * c
    order = torch.sort(-chunk_scores, dim=-1, stable=True).indices                     # best first, ties low
    Bp = budget - w
    before = torch.cumsum(sizes[order], -1) - sizes[order]
    whole = (before + sizes[order] <= Bp) & (torch.cumsum((before + sizes[order] > Bp).int(), -1) == 0)
    keep = torch.zeros(B, n_chunks * c, dtype=torch.bool, device=k.device)
    chunk_of = order.masked_fill(~whole, n_chunks)
    tok = (chunk_of[..., None] * c + torch.arange(c, device=k.device)).clamp_max(n_chunks * c)
    keep = torch.nn.functional.pad(keep, (0, 1)).scatter(1, tok.view(B, -1), True)[:, : n_chunks * c]
    n_whole = whole.sum(-1)                                            # the first chunk that does not fit
    left = Bp - (sizes[order] * whole).sum(-1)                         # is cut to its best tokens
    cut = order.gather(1, n_whole.clamp_max(n_chunks - 1)[:, None])[:, 0]
    cut_tok = cut[:, None] * c + torch.arange(c, device=k.device)
    cut_scores = padded.gather(1, cut_tok.clamp_max(n_chunks * c - 1)).masked_fill(cut_tok >= P, float("-inf"))
    rank = torch.sort(-cut_scores, dim=-1, stable=True).indices
    take = torch.arange(c, device=k.device)[None, :] < left[:, None]
    chosen = cut_tok.gather(1, rank).masked_fill(~take, n_chunks * c)
    keep = torch.nn.functional.pad(keep, (0, 1)).scatter(1, chosen, True)[:, :P]
    keep = torch.cat([keep, torch.ones(B, w, dtype=torch.bool, device=k.device)], -1)
    return keep.nonzero()[:, 1].view(B, budget)                        # a host sync (data-dependent shape)


def torch_gather(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor):
    g = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, g), v.gather(2, g)


def torch_compact_(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor):
    n = idx.shape[-1]
    kk, vv = torch_gather(k, v, idx)  # through a temporary: the rows read and written overlap
    k[:, :, :n].copy_(kk)
    v[:, :, :n].copy_(vv)
    return k[:, :, :n], v[:, :, :n]


# ----------------------------------------------------------------------------- timing


class Timer:
    """Milliseconds per call of fn(i): CUDA events on a GPU, the host clock (after each call) on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[int], Any], warmup: int = 2, target_s: float = 0.25, max_reps: int = 50) -> list:
        t0 = time.perf_counter()
        for i in range(warmup):
            fn(i)
        self.sync()
        per_call = max((time.perf_counter() - t0) / max(warmup, 1), 1e-6)
        reps = int(min(max_reps, max(5, target_s / per_call)))
        if not self.cuda:
            out = []
            for i in range(reps):
                t = time.perf_counter()
                fn(i)
                out.append((time.perf_counter() - t) * 1e3)
            return out
        events = []
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Report:
    """Appends one JSON record a line to path (flushed at once) and keeps them for the table."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        self.records: list = []

    def add(self, **record: Any) -> dict:
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def measure_ceilings(report: Report, timer: Timer, device: torch.device, cfg: dict) -> tuple:
    """(bytes/s of a device-to-device copy counting read + write, bf16 matmul FLOP/s on random data)."""
    n = cfg["copy_bytes"] // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(timer.run(lambda i: dst.copy_(src), warmup=3, max_reps=20))
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    report.add(kind="ceiling", what="copy", bytes=2 * n * 4, ms=ms, value=bw, unit="B/s")
    del src, dst
    m = cfg["matmul_n"]
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms = statistics.median(timer.run(lambda i: a @ b, warmup=3, max_reps=10))
    rate = 2 * m ** 3 / (ms * 1e-3)
    report.add(kind="ceiling", what="bf16 matmul", n=m, ms=ms, value=rate, unit="FLOP/s")
    return bw, rate


def op_costs(cfg: dict, L: int, n: int, elt: int) -> dict:
    """op -> (fewest bytes moved, matrix FLOPs): each input read once, each output written once."""
    B, Hq, Hkv, D, w = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["w"]
    P = L - w
    qk = B * Hq * w * D * elt + B * Hkv * L * D * elt
    flops = 2 * B * Hq * w * L * D
    rows = 2 * (2 * B * Hkv * n * D * elt) + B * n * 8  # keys and values: n rows read and written; indices
    return {"score": (qk + B * Hkv * P * 4, flops), "select": (qk + B * n * 8, flops),
            "gather": (rows, 0), "compact_": (rows, 0)}


def n_copies(set_bytes: int, device: torch.device) -> int:
    """Input sets to rotate through so that one call does not find the last call's data in L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return int(min(8, max(1, math.ceil(3 * l2 / set_bytes))))


def run_case(report: Report, timer: Timer, device: torch.device, cfg: dict, dtype_name: str, L: int,
             ceilings: tuple) -> bool:
    """Check and time the four ops at one length and dtype; True when every check passed."""
    dtype = getattr(torch, dtype_name)
    B, Hq, Hkv, D, w = cfg["B"], cfg["Hq"], cfg["Hkv"], cfg["D"], cfg["w"]
    budget = max(w, L // 10)
    gen = torch.Generator(device=device).manual_seed(L)
    set_bytes = 2 * B * Hkv * L * D * 2
    copies = n_copies(set_bytes, device)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    Q = [randn(B, Hq, w, D) for _ in range(copies)]
    K = [randn(B, Hkv, L, D) for _ in range(copies)]
    V = [randn(B, Hkv, L, D) for _ in range(copies)]

    # checks, once, on the first set
    s_ckv, s_ref = chunkkv.score(Q[0], K[0]), torch_scores(Q[0], K[0])
    idx, idx_ref = chunkkv.select(Q[0], K[0], budget=budget, chunk_size=CHUNK), torch_select(Q[0], K[0], budget)
    gk, gv = chunkkv.gather(K[0], V[0], idx)
    rk, rv = torch_gather(K[0], V[0], idx)
    ck, cv = chunkkv.compact_(K[0].clone(), V[0].clone(), idx)
    err = rel_error(s_ckv, s_ref)
    same = float((idx == idx_ref).double().mean()) if idx.shape == idx_ref.shape else 0.0
    checks = {"score": (f"rel err {err:.1e}", err < 1e-4),
              "select": (f"{same:.1%} equal to torch", same >= 0.95),  # a near-tie swaps a chunk
              "gather": ("bit-exact" if torch.equal(gk, rk) and torch.equal(gv, rv) else "DIFFERS",
                         torch.equal(gk, rk) and torch.equal(gv, rv)),
              "compact_": ("bit-exact" if torch.equal(ck, rk) and torch.equal(cv, rv) else "DIFFERS",
                           torch.equal(ck, rk) and torch.equal(cv, rv))}
    IDX = [chunkkv.select(Q[i], K[i], budget=budget, chunk_size=CHUNK) for i in range(copies)]
    KC, VC = [k.clone() for k in K], [v.clone() for v in V]
    del s_ckv, s_ref, gk, gv, rk, rv, ck, cv

    j = lambda i: i % copies  # noqa: E731
    impls = {
        "score": (lambda i: chunkkv.score(Q[j(i)], K[j(i)]), lambda i: torch_scores(Q[j(i)], K[j(i)])),
        "select": (lambda i: chunkkv.select(Q[j(i)], K[j(i)], budget=budget, chunk_size=CHUNK),
                   lambda i: torch_select(Q[j(i)], K[j(i)], budget)),
        "gather": (lambda i: chunkkv.gather(K[j(i)], V[j(i)], IDX[j(i)]),
                   lambda i: torch_gather(K[j(i)], V[j(i)], IDX[j(i)])),
        "compact_": (lambda i: chunkkv.compact_(KC[j(i)], VC[j(i)], IDX[j(i)]),
                     lambda i: torch_compact_(KC[j(i)], VC[j(i)], IDX[j(i)])),
    }
    bw, rate = ceilings
    costs = op_costs(cfg, L, budget, dtype.itemsize)
    for op in OPS:
        nbytes, flops = costs[op]
        floor_ms = max(nbytes / bw, flops / rate) * 1e3
        row = dict(kind="op", dtype=dtype_name, L=L, op=op, B=B, Hq=Hq, Hkv=Hkv, D=D, w=w, budget=budget,
                   chunk=CHUNK, copies=copies, bytes=nbytes, flops=flops, floor_ms=floor_ms,
                   check=checks[op][0], check_ok=bool(checks[op][1]))
        for name, fn in zip(("chunkkv", "torch"), impls[op]):
            times = timer.run(fn)
            ms = statistics.median(times)
            row[name] = dict(ms=ms, ms_min=min(times), reps=len(times), x_floor=ms / floor_ms,
                             GBps=nbytes / (ms * 1e-3) / 1e9, TFLOPs=flops / (ms * 1e-3) / 1e12)
        report.add(**row)
        print(table_row(row), flush=True)
    del Q, K, V, IDX, KC, VC
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return all(ok for _, ok in checks.values())


HEADER = (f"{'dtype':<9}{'L':>7}  {'op':<9}{'chunkkv ms':>11}{'torch ms':>10}{'floor ms':>10}"
          f"{'ckv/floor':>10}{'torch/floor':>12}{'ckv GB/s':>10}  check")


def table_row(r: dict) -> str:
    c, t = r["chunkkv"], r["torch"]
    return (f"{r['dtype']:<9}{r['L']:>7}  {r['op']:<9}{c['ms']:>11.4f}{t['ms']:>10.4f}{r['floor_ms']:>10.4f}"
            f"{c['x_floor']:>10.1f}{t['x_floor']:>12.1f}{c['GBps']:>10.0f}  {r['check']}"
            + ("" if r["check_ok"] else "  <-- CHECK FAILED"))


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/chunkkv-timing")),
                    help="folder for timing.jsonl (default: $OUT, else /tmp/chunkkv-timing)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="stop starting new cases once this many seconds have passed (default 100)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: test the script without a GPU")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    report = Report(args.out / "timing.jsonl")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("cuda_timing: torch sees no GPU (torch.cuda.is_available() is False)", flush=True)
            return 2
        if not chunkkv.build_info()["cuda"]:
            print("cuda_timing: chunkkv was built without CUDA", flush=True)
            return 2
        props = torch.cuda.get_device_properties(device)
        env = dict(gpu=props.name, sms=props.multi_processor_count, L2=getattr(props, "L2_cache_size", None),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        env = dict(gpu=None)
    report.add(kind="env", device=device.type, torch=torch.__version__, chunkkv=chunkkv.build_info(),
               dry_run=args.dry_run, **env)
    print(f"cuda_timing on {env.get('gpu') or 'cpu (dry run)'}; torch {torch.__version__}", flush=True)
    timer = Timer(device)
    torch.manual_seed(0)
    bw, rate = measure_ceilings(report, timer, device, cfg)
    print(f"ceilings: copy {bw / 1e12:.2f} TB/s (read + write), bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)
    print(HEADER, flush=True)
    ok = True
    cases = [(d, L) for d in cfg["dtypes"] for L in cfg["lengths"]]
    for n_done, (dtype_name, L) in enumerate(cases):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            for d, l2 in cases[n_done:]:
                report.add(kind="skipped", dtype=d, L=l2, reason=f"time budget of {args.budget_s:.0f} s spent")
            print(f"cuda_timing: time budget spent, {len(cases) - n_done} case(s) skipped", flush=True)
            break
        try:
            ok &= run_case(report, timer, device, cfg, dtype_name, L, (bw, rate))
        except Exception as e:  # one broken case must not cost the others their figures
            traceback.print_exc()
            report.add(kind="error", dtype=dtype_name, L=L, error=f"{type(e).__name__}: {e}")
            ok = False
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"cuda_timing: done in {time.perf_counter() - t_start:.1f} s; "
          f"{'all checks passed' if ok else 'SOME CHECKS FAILED'}; records in {report.path}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
