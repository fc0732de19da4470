"""The one-shot GPU check: build with nvcc, correctness, compute-sanitizer and timings in one run of < 9 min.

On the lent GPU machine (the device tool's `run`; the working tree travels, nothing needs carrying: the
machine's python3 already holds torch, numpy, pytest, pytest-xdist, pytest-timeout, setuptools and wheel,
and nvcc 13 with compute-sanitizer; nothing can be downloaded there):

    run(command="python3 tools/gpu_check.py", timeout_s=590)      # carry: none

The run ends by 535 s whatever happens; with the machine's start-up (1-2 min) it fits one 15-minute lease
once, with no room for a second full run: fetch the files, then give the machine back. The output tail
ends with summary.txt and the timing table.

Without a GPU (CI runs this through tests/test_gpu_check.py):

    python3 tools/gpu_check.py --dry-run [--out DIR]

--skip STEP leaves steps out (e.g. only build, smoke and timing for a shorter call); --box STEP=SECONDS
changes a time box.

Steps, each in its own time box (seconds; they add up to 520, and a global deadline of 535 s shrinks or skips
a step that would run past it), each step's output in $OUT/<log>, and a line per step appended to
$OUT/summary.txt as soon as the step ends (a run cut short keeps what it finished):

  info       15  nvidia-smi (name, driver, compute capability), python / torch / nvcc versions, which
                 compute-sanitizer there is and whether it filters kernels by name     -> summary.txt
  build      90  CHUNKKV_CUDA=1 pip install -e . --no-build-isolation --no-deps (no network), else
                 setup.py build_ext --inplace; -lineinfo for the sanitizers; targets the card's compute
                 capability only (CHUNKKV_CUDA_ARCHS); build_info()["cuda"] must be True -> build.log
  smoke      40  tests_gpu/smoke.py: every kernel once against the CPU core            -> smoke.log
  timing    100  tools/cuda_timing.py: score, select, gather, compact_ at L 8k/32k/128k, bf16 and fp16,
                 beside PyTorch on the GPU, with the copy bandwidth and bf16 matmul rate -> timing.log, .jsonl
  tests_gpu 130  pytest tests_gpu, 6 workers (pytest-xdist) of 2 OpenMP threads each, 90 s per test
                 (pytest-timeout) when those plugins are there                          -> tests_gpu.log
  memcheck   70  compute-sanitizer --tool memcheck on smoke.py, chunkkv's kernels only (--kernel-name
                 kns=ckv), --report-api-errors no, --error-exitcode 9                  -> sanitizer.log
  racecheck  75  compute-sanitizer --tool racecheck, likewise                          -> sanitizer.log

All later steps import the checkout's chunkkv (PYTHONPATH is the repository root), so an in-place build
serves as well as an editable install. A missing compute-sanitizer or kernel filter is said in the summary,
never skipped silently. Exit status: 0 when no step failed or timed out (a skipped sanitizer is not a failure).
$OUT is the device tool's return folder (at most 8 files come back: this writes 7); without it, --out or a
fresh folder under /tmp.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DEADLINE_S = 535.0  # the whole run; the device tool's per-command limit is 600 s and a lease 900 s
LOG_CAP = 8 << 20  # bytes kept per log (a returned file may hold 16 MiB)
KERNEL_FILTER = "ckv"  # every chunkkv kernel lives in namespace ckv (mangled _ZN3ckv..., demangled ckv::)
SANITIZER_CANDIDATES = ("/usr/local/cuda/bin/compute-sanitizer",
                        "/usr/local/cuda/compute-sanitizer/compute-sanitizer")


@dataclasses.dataclass
class Step:
    name: str
    box: float  # seconds
    log: str  # file name under the output folder
    command: Optional[list] = None  # None only for a step that is skipped
    needs_build: bool = True
    note: str = ""
    skip: str = ""  # non-empty: the step is not run, this says why
    ok_codes: tuple = (0,)  # exit statuses that count as success


BOXES = {"info": 15, "build": 90, "smoke": 40, "timing": 100, "tests_gpu": 130, "memcheck": 70, "racecheck": 75}


def find_sanitizer() -> Optional[str]:
    """compute-sanitizer: $CHUNKKV_SANITIZER ("none": there is none), else on PATH, beside nvcc, or in the
    usual CUDA folders."""
    chosen = os.environ.get("CHUNKKV_SANITIZER")
    if chosen:
        return None if chosen == "none" else chosen
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    candidates = list(SANITIZER_CANDIDATES)
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        candidates = [str(home / "bin" / "compute-sanitizer"), str(home / "compute-sanitizer" / "compute-sanitizer")]
        candidates += list(SANITIZER_CANDIDATES)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


def sanitizer_flags(sanitizer: str) -> tuple:
    """(flags, what they are) from what this compute-sanitizer's --help offers: limit checking to chunkkv's
    kernels (--kernel-name kns=ckv since 2022, --filter kns=ckv before; none when it names neither), and
    --report-api-errors no: torch's expected CUDA API failures would count as errors, and chunkkv turns every
    failed CUDA call of its own into a Python exception, which fails smoke.py."""
    try:
        r = subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=20)
        text = r.stdout + r.stderr
    except (OSError, subprocess.SubprocessError) as e:
        return [], f"could not run {sanitizer} --help ({e}): no kernel filter, torch's kernels are checked too"
    api = ["--report-api-errors", "no"] if "--report-api-errors" in text else []
    if "--kernel-name" in text:
        return ["--kernel-name", f"kns={KERNEL_FILTER}", *api], f"kernel filter --kernel-name kns={KERNEL_FILTER}"
    if "--filter" in text:
        return ["--filter", f"kns={KERNEL_FILTER}", *api], f"kernel filter --filter kns={KERNEL_FILTER}"
    return api, "this compute-sanitizer has no kernel name filter: torch's kernels are checked too (slower)"


def compute_capability() -> Optional[str]:
    """The first GPU's compute capability as nvcc writes it ("90"), from nvidia-smi; None when unknown."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"\s*(\d+)\.(\d+)", r.stdout)
    return m.group(1) + m.group(2) if r.returncode == 0 and m else None


def child_env(arch: Optional[str]) -> dict:
    """The environment every step runs in: this checkout first on sys.path, bounded host threads, CUDA build
    knobs (an explicit CHUNKKV_CUDA=1, -lineinfo for the sanitizers' reports, the card's own target)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CHUNKKV_NUM_THREADS"):
        env.setdefault(var, "2")  # 6 pytest workers x 2 threads on the 16-core machine
    env.setdefault("CUDA_MODULE_LOADING", "LAZY")  # load (and instrument) only the kernels a step runs
    env["CHUNKKV_CUDA"] = "1"
    env["CHUNKKV_NVCC_FLAGS"] = (env.get("CHUNKKV_NVCC_FLAGS", "") + " -lineinfo").strip()
    if arch and "CHUNKKV_CUDA_ARCHS" not in env:
        env["CHUNKKV_CUDA_ARCHS"] = arch  # one target: half the nvcc time of the default two
    return env


def plan(dry_run: bool, out: Path, boxes: dict, fake_sleep: dict) -> tuple:
    """(steps, facts for the summary header): the commands each step runs, or why it is skipped."""
    facts = []
    san = find_sanitizer()
    if san:
        san_flags, filter_note = sanitizer_flags(san)
        facts.append(f"compute-sanitizer: {san}; {filter_note}")
    else:
        san_flags, filter_note = [], ""
        facts.append("compute-sanitizer: NOT FOUND (looked on PATH, beside nvcc and in /usr/local/cuda): "
                     "memcheck and racecheck are skipped")
    have_xdist = importlib.util.find_spec("xdist") is not None
    have_timeout = importlib.util.find_spec("pytest_timeout") is not None
    facts.append(f"pytest-xdist: {'yes' if have_xdist else 'no (one worker)'}; "
                 f"pytest-timeout: {'yes' if have_timeout else 'no (no per-test limit)'}")
    info_cmd = [PY, "-c", INFO_SCRIPT]
    build_cmd = ["bash", "-c", BUILD_SCRIPT.format(py=shlex.quote(PY))]
    smoke = [PY, "tests_gpu/smoke.py"]
    pytest_cmd = [PY, "-m", "pytest", "tests_gpu", "-q", "-ra", "-p", "no:cacheprovider", "--durations=10"]
    if have_xdist:
        pytest_cmd += ["-n", "6"]
    if have_timeout:
        pytest_cmd += ["--timeout", "90"]
    timing_budget = max(10, boxes["timing"] - 25)  # the last case started must still finish inside the box
    timing = [PY, "tools/cuda_timing.py", "--out", str(out), "--budget-s", str(timing_budget)]
    san_cmd = lambda tool: [san, "--tool", tool, *san_flags, "--error-exitcode", "9",  # noqa: E731
                            "--print-limit", "20", PY, "tests_gpu/smoke.py"]
    if dry_run:  # the same sequence; what needs a GPU is replaced by its CPU counterpart or an echo
        build_cmd = [PY, "-c", "import chunkkv; print('dry run: would build with nvcc; installed:', "
                               "chunkkv.build_info())"]
        smoke = [PY, "tests_gpu/smoke.py", "--device", "cpu"]
        timing = [PY, "tools/cuda_timing.py", "--dry-run", "--out", str(out), "--budget-s", str(timing_budget)]
        pytest_cmd = [PY, "-m", "pytest", "tests_gpu", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider"]
        real_san_cmd = san_cmd
        san_cmd = lambda tool: [PY, "-c", "import sys; print('dry run: would run', sys.argv[1:])",  # noqa: E731
                                *real_san_cmd(tool)]
    steps = [
        Step("info", boxes["info"], "info.tmp", info_cmd, needs_build=False),
        Step("build", boxes["build"], "build.log", build_cmd, needs_build=False),
        Step("smoke", boxes["smoke"], "smoke.log", smoke),
        Step("timing", boxes["timing"], "timing.log", timing),
        # without a GPU, test_cuda.py skips itself at import: pytest collects nothing (exit status 5)
        Step("tests_gpu", boxes["tests_gpu"], "tests_gpu.log", pytest_cmd, ok_codes=(0, 5) if dry_run else (0,)),
    ]
    for tool in ("memcheck", "racecheck"):
        if san:
            steps.append(Step(tool, boxes[tool], "sanitizer.log", san_cmd(tool), note=filter_note))
        else:
            steps.append(Step(tool, boxes[tool], "sanitizer.log", skip="compute-sanitizer not found"))
    for step in steps:
        if step.name in fake_sleep:  # tests: a step that overruns its box
            step.command = [PY, "-c", "import os, sys, time; print('sleeping', os.getpid(), flush=True); "
                                      f"time.sleep({fake_sleep[step.name]})"]
    return steps, facts


INFO_SCRIPT = r"""
import shutil, subprocess, sys
def show(cmd):
    if not shutil.which(cmd[0]):
        print(f"{cmd[0]}: not found"); return
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"{cmd[0]}: failed ({e})"); return
    lines = (r.stdout + r.stderr).strip().splitlines() or ["(no output)"]
    print(cmd[0] + ":", lines[-1] if cmd[0] == "nvcc" else " | ".join(lines))
show(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap,clocks.sm,clocks.max.sm",
      "--format=csv,noheader"])
show(["nvcc", "--version"])
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    print("torch", torch.__version__, "| cuda", torch.version.cuda, "| gpus", torch.cuda.device_count())
except Exception as e:
    print("torch: not importable:", e)
"""

BUILD_SCRIPT = r"""
set -o pipefail
{py} -m pip install -e . --no-build-isolation --no-deps --no-index --disable-pip-version-check -v || {{
    echo "gpu_check: pip install -e failed; building in place (setup.py build_ext --inplace)"
    {py} setup.py build_ext --inplace || exit 1
}}
{py} -c "import chunkkv; i = chunkkv.build_info(); print('gpu_check: chunkkv from', chunkkv.__file__, i); \
assert i['cuda'], 'chunkkv was built without CUDA (nvcc not found?)'"
"""


class Summary:
    """summary.txt: a header, then one line per step, each appended and flushed as the step ends."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list = []

    def write(self, line: str) -> None:
        self.lines.append(line)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


class Interrupted(Exception):
    """The run got SIGTERM or SIGINT (the device tool's time limit, say): the summary says so before exiting."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def kill_group(proc: subprocess.Popen) -> None:
    """End a step's whole process group (compute-sanitizer's child too): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_boxed(cmd: list, box: float, log_path: Path, env: dict, echo: Callable[[str], None]) -> tuple:
    """Run cmd in its own process group with output appended to log_path (capped) and echoed; kill the whole
    group when it outlives box seconds. (return code or None on a timeout, seconds, last output lines)."""
    t0 = time.monotonic()
    tail: list = []
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            log.write(f"could not start: {e}\n".encode())
            return 127, time.monotonic() - t0, [f"could not start: {e}"]
        written = [log_path.stat().st_size]

        def pump():
            for raw in iter(proc.stdout.readline, b""):
                if written[0] < LOG_CAP:
                    log.write(raw)
                    log.flush()
                    written[0] += len(raw)
                    if written[0] >= LOG_CAP:
                        log.write(b"\n[gpu_check: log capped here]\n")
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                del tail[:-40]
                echo(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc: Optional[int] = proc.wait(timeout=box)
        except subprocess.TimeoutExpired:
            rc = None
            kill_group(proc)
            log.write(f"\n[gpu_check: killed after its {box:.0f} s box]\n".encode())
        except BaseException:  # Interrupted, KeyboardInterrupt: leave no step running behind
            kill_group(proc)
            log.write(b"\n[gpu_check: interrupted]\n")
            raise
        reader.join(timeout=5)
    return rc, time.monotonic() - t0, tail


def outcome_note(step: Step, tail: list, out: Path) -> str:
    """The step's figure for its summary line, read from the end of its output."""
    text = "\n".join(tail)
    if step.name == "build":
        m = re.search(r"gpu_check: chunkkv from .*?(\{.*\})|installed: (\{.*\})", text)
        return (m.group(1) or m.group(2)) if m else ""
    if step.name == "smoke":
        return next((ln for ln in reversed(tail) if ln.startswith("smoke: ok") or "Error" in ln), "")
    if step.name == "tests_gpu":
        counts = next((ln.strip("= ") for ln in reversed(tail)
                       if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)|tests? collected|collected", ln)), "")
        reason = next((ln for ln in tail if ln.startswith("SKIPPED")), "")
        return "; ".join(x for x in (counts, reason) if x)
    if step.name in ("memcheck", "racecheck"):
        found = [ln.replace("========= ", "") for ln in tail if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
        api = sum("Program hit" in ln for ln in tail)
        note = "; ".join(found) or next((ln for ln in reversed(tail) if ln.strip()), "")
        if any(ln.startswith("smoke: ok") for ln in tail):
            note = "smoke ok; " + note
        return note + (f" ({api} CUDA API error reports in the log tail)" if api else "") + f"; {step.note}"
    if step.name == "timing":
        return timing_note(out / "timing.jsonl")
    return ""


def timing_note(path: Path) -> str:
    """Ceilings, the number of rows, failed checks, and the bf16 row at the largest length, from timing.jsonl."""
    if not path.exists():
        return "no timing.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    ceil = {r["what"]: r["value"] for r in recs if r.get("kind") == "ceiling"}
    ops = [r for r in recs if r.get("kind") == "op"]
    bad = [f"{r['dtype']} {r['L']} {r['op']}" for r in ops if not r["check_ok"]]
    bad += [f"{r['dtype']} {r['L']} raised {r['error']}" for r in recs if r.get("kind") == "error"]
    parts = []
    if "copy" in ceil:
        parts.append(f"copy {ceil['copy'] / 1e12:.2f} TB/s")
    if "bf16 matmul" in ceil:
        parts.append(f"bf16 {ceil['bf16 matmul'] / 1e12:.0f} TFLOP/s")
    parts.append(f"{len(ops)} op rows, {sum(r.get('kind') == 'skipped' for r in recs)} cases skipped")
    if bad:
        parts.append("CHECKS FAILED: " + ", ".join(bad))
    top = [r for r in ops if r["dtype"] == "bfloat16"]
    if top:
        L = max(r["L"] for r in top)
        parts.append(f"bf16 L={L} ms chunkkv/torch: " + ", ".join(
            f"{r['op']} {r['chunkkv']['ms']:.3g}/{r['torch']['ms']:.3g}" for r in top if r["L"] == L))
    return "; ".join(parts)


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run the sequence without a GPU: CPU stand-ins for the GPU steps (what CI tests)")
    ap.add_argument("--out", type=Path, help="output folder (default: $OUT, else a new folder in /tmp)")
    ap.add_argument("--box", action="append", default=[], metavar="STEP=SECONDS", help="override a step's box")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for the whole run ({DEADLINE_S:.0f})")
    ap.add_argument("--fake-sleep", action="append", default=[], metavar="STEP=SECONDS",
                    help="(tests) replace a step's command by a sleep")
    ap.add_argument("--skip", action="append", default=[], choices=list(BOXES), metavar="STEP",
                    help="leave a step out (repeatable), e.g. a second short call for the timings alone")
    ap.add_argument("--quiet", action="store_true", help="do not echo the steps' output")
    args = ap.parse_args(argv)

    def pairs(items: list, what: str) -> dict:
        got = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in BOXES or not value:
                ap.error(f"{what}: expected STEP=SECONDS with STEP in {sorted(BOXES)}, got {item!r}")
            got[name] = float(value)
        return got

    boxes = {**BOXES, **pairs(args.box, "--box")}
    fake_sleep = pairs(args.fake_sleep, "--fake-sleep")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       Path(tempfile.mkdtemp(prefix="chunkkv-gpu-check-")))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.txt", "build.log", "smoke.log", "timing.log", "timing.jsonl", "tests_gpu.log",
                 "sanitizer.log"):
        (out / name).unlink(missing_ok=True)
    t_start = time.monotonic()
    summary = Summary(out / "summary.txt")
    echo = (lambda line: None) if args.quiet else (lambda line: print("  | " + line, flush=True))
    summary.write(f"# chunkkv GPU check{' (DRY RUN: no GPU, CPU stand-ins)' if args.dry_run else ''}, "
                  f"started {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, deadline {args.deadline:.0f} s, "
                  f"boxes " + " ".join(f"{k} {v:.0f}" for k, v in boxes.items()) + f" (sum {sum(boxes.values()):.0f} s)")
    steps, facts = plan(args.dry_run, out, boxes, fake_sleep)
    for step in steps:
        if step.name in args.skip:
            step.skip = "left out (--skip)"
    arch = None if args.dry_run else compute_capability()
    facts.append(f"CUDA target: {'sm_' + arch if arch else 'the default ones (nvidia-smi gave no compute capability)'}")
    for fact in facts:
        summary.write("# " + fact)
    env = child_env(arch)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        failed = run_steps(steps, args.deadline, t_start, out, env, summary, echo)
    except Interrupted as e:
        summary.write(f"# INTERRUPTED by {e} at t+{time.monotonic() - t_start:.0f} s: the steps above finished")
        return 128 + e.signum
    summary.write(f"# total {time.monotonic() - t_start:.0f} s; {'SOME STEPS FAILED' if failed else 'no step failed'}")
    print("\n=== summary (" + str(out / "summary.txt") + ")", flush=True)
    print(summary.path.read_text(), flush=True)
    timing_log = out / "timing.log"
    if timing_log.exists():  # the table last, so that the device tool's output tail holds it
        print("=== timing table", flush=True)
        print("\n".join(ln for ln in timing_log.read_text().splitlines()
                        if not ln.startswith("$ ") and ln.strip())[-6000:], flush=True)
    return 1 if failed else 0


def run_steps(steps: list, deadline: float, t_start: float, out: Path, env: dict, summary: Summary,
              echo: Callable[[str], None]) -> bool:
    """Run the steps in order, each in its box and inside the deadline; True when one failed or timed out."""
    failed = False
    build_ok = True
    for step in steps:
        left = deadline - (time.monotonic() - t_start)
        box = min(step.box, left)
        print(f"=== {step.name} (t+{time.monotonic() - t_start:.0f} s, box {box:.0f} s)", flush=True)
        if step.skip or (step.needs_build and not build_ok) or box < 5:
            why = step.skip or ("the build failed" if step.needs_build and not build_ok else
                                f"no time left before the {deadline:.0f} s deadline")
            summary.write(f"{step.name:<10} {'SKIPPED':<10} {0:>5.0f}s/{step.box:<4.0f} {why}")
            continue
        if step.name == "info":  # the machine's facts go into the summary itself, as comment lines
            tmp = out / "info.tmp"
            rc, secs, tail = run_boxed(step.command, box, tmp, env, echo)
            tmp.unlink(missing_ok=True)
            for line in tail:
                if line.strip() and not line.startswith("$ "):
                    summary.write("# " + line)
        else:
            try:
                rc, secs, tail = run_boxed(step.command, box, out / step.log, env, echo)
            except Interrupted as e:
                summary.write(f"{step.name:<10} INTERRUPTED at t+{time.monotonic() - t_start:.0f}s by {e}; "
                              f"its output so far is in {step.log}")
                raise
        ok = rc in step.ok_codes
        status = "ok" if ok else ("TIMEOUT" if rc is None else f"FAILED({rc})")
        if not ok:
            failed = True
            if step.name == "build":
                build_ok = False
        last = next((ln for ln in reversed(tail) if ln.strip() and not ln.startswith("[gpu_check")), "")
        note = outcome_note(step, tail, out) if rc is not None else f"killed after {box:.0f} s; last output: {last}"
        if not ok and rc is not None and not note:
            note = next((ln for ln in reversed(tail) if ln.strip()), "")
        summary.write(f"{step.name:<10} {status:<10} {secs:>5.0f}s/{step.box:<4.0f} {note}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
