"""The one-shot GPU check (tools/gpu_check.py) and its timing script (tools/cuda_timing.py), without a GPU.

The dry run goes through the same steps with CPU stand-ins (smoke.py and cuda_timing.py on the CPU, a
collect-only pytest of tests_gpu, echoed sanitizer commands); these tests check the sequence, the summary
written line by line as steps end, the time boxes and the deadline, what a missing compute-sanitizer or
kernel filter is reported as, and that a killed run keeps what it finished and leaves no step running.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"
STEPS = ["info", "build", "smoke", "timing", "tests_gpu", "memcheck", "racecheck"]
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool returns from $OUT


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("OUT", None)
    return env


def _run(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> tuple:
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--quiet", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=timeout, env=env or _env(CHUNKKV_SANITIZER="none"))
    return r, out


def _step_lines(out: Path) -> dict:
    """step name -> its summary line (comment lines start with '#')."""
    lines = [ln for ln in (out / "summary.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    return {ln.split()[0]: ln for ln in lines}


def _fake_sanitizer(tmp_path: Path, help_text: str) -> Path:
    path = tmp_path / "compute-sanitizer"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
    path.chmod(0o755)
    return path


def test_boxes_fit_the_device_limits():
    """Every box together under 540 s (a lease is 900 s with start-up, a command at most 600 s)."""
    assert sum(gpu_check.BOXES.values()) < 540
    assert gpu_check.DEADLINE_S < 540 and list(gpu_check.BOXES) == STEPS


def test_dry_run_goes_through_every_step(tmp_path):
    r, out = _run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _step_lines(out)
    assert list(lines) == STEPS
    assert all(" ok " in lines[s] for s in STEPS[:5]), lines
    assert "smoke: ok (cpu)" in lines["smoke"]
    assert "SKIPPED" in lines["memcheck"] and "compute-sanitizer not found" in lines["memcheck"]
    assert "SKIPPED" in lines["racecheck"]
    head = (out / "summary.txt").read_text()
    assert "compute-sanitizer: NOT FOUND" in head and "DRY RUN" in head
    # the timing script ran on the CPU: every op of every case, each checked against the torch version
    recs = [json.loads(ln) for ln in (out / "timing.jsonl").read_text().splitlines()]
    ops = [x for x in recs if x["kind"] == "op"]
    assert len(ops) == 2 * 2 * 4 and all(x["check_ok"] for x in ops), [x["check"] for x in ops]
    assert {x["what"] for x in recs if x["kind"] == "ceiling"} == {"copy", "bf16 matmul"}
    assert "16 op rows" in lines["timing"]
    # what comes back from the device machine: at most 8 plain files with plain names
    files = list(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and SAFE_NAME.match(f.name) for f in files), files
    assert "=== summary" in r.stdout and "=== timing table" in r.stdout


def test_a_step_over_its_box_is_killed_and_the_next_steps_run(tmp_path):
    fast = [a for s in ("info", "build", "timing", "tests_gpu") for a in ("--fake-sleep", f"{s}=0")]
    t0 = time.monotonic()
    r, out = _run(tmp_path, "--fake-sleep", "smoke=60", "--box", "smoke=5", *fast)
    assert time.monotonic() - t0 < 40
    assert r.returncode == 1
    lines = _step_lines(out)
    assert "TIMEOUT" in lines["smoke"] and "killed after 5 s; last output: sleeping" in lines["smoke"]
    assert " ok " in lines["timing"] and " ok " in lines["tests_gpu"]
    assert "killed after its 5 s box" in (out / "smoke.log").read_text()


def test_the_deadline_skips_what_no_longer_fits(tmp_path):
    fast = [a for s in ("info", "smoke", "timing", "tests_gpu") for a in ("--fake-sleep", f"{s}=0")]
    r, out = _run(tmp_path, "--deadline", "9", "--fake-sleep", "build=5", *fast)
    lines = _step_lines(out)
    assert " ok " in lines["build"]
    for s in ("smoke", "timing", "tests_gpu"):
        assert "SKIPPED" in lines[s] and "no time left before the 9 s deadline" in lines[s]


def test_steps_left_out(tmp_path):
    r, out = _run(tmp_path, "--skip", "tests_gpu", "--skip", "smoke", "--fake-sleep", "timing=0")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _step_lines(out)
    assert list(lines) == STEPS and " ok " in lines["timing"]
    assert "left out (--skip)" in lines["tests_gpu"] and "left out (--skip)" in lines["smoke"]


def test_a_failed_build_skips_the_gpu_steps(tmp_path):
    r, out = _run(tmp_path, "--fake-sleep", "info=0", "--fake-sleep", "build=-1")  # time.sleep(-1) raises
    lines = _step_lines(out)
    assert r.returncode == 1 and "FAILED(1)" in lines["build"]
    for s in ("smoke", "timing", "tests_gpu"):
        assert "SKIPPED" in lines[s] and "the build failed" in lines[s]


def test_sanitizer_with_kernel_filter(tmp_path):
    san = _fake_sanitizer(tmp_path, "Usage: compute-sanitizer [options]\n  --kernel-name arg  filter kernels")
    fast = [a for s in ("info", "build", "smoke", "timing", "tests_gpu") for a in ("--fake-sleep", f"{s}=0")]
    r, out = _run(tmp_path, *fast, env=_env(CHUNKKV_SANITIZER=str(san)))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = _step_lines(out)
    assert " ok " in lines["memcheck"] and "kernel filter --kernel-name kns=ckv" in lines["memcheck"]
    log = (out / "sanitizer.log").read_text()
    for tool in ("memcheck", "racecheck"):
        assert re.search(rf"would run \[.*'--tool', '{tool}', '--kernel-name', 'kns=ckv', '--error-exitcode', '9'.*"
                         r"'tests_gpu/smoke.py'\]", log), log


def test_sanitizer_filter_detection(tmp_path):
    new = _fake_sanitizer(tmp_path, "  --kernel-name <filter>\n  --report-api-errors <all|explicit|no>")
    assert gpu_check.sanitizer_flags(str(new))[0] == ["--kernel-name", "kns=ckv", "--report-api-errors", "no"]
    (tmp_path / "old").mkdir()
    old = _fake_sanitizer(tmp_path / "old", "  --filter <filter>")
    assert gpu_check.sanitizer_flags(str(old))[0] == ["--filter", "kns=ckv"]
    (tmp_path / "none").mkdir()
    flags, note = gpu_check.sanitizer_flags(str(_fake_sanitizer(tmp_path / "none", "  --tool <name>")))
    assert flags == [] and "no kernel name filter" in note
    flags, note = gpu_check.sanitizer_flags(str(tmp_path / "missing"))
    assert flags == [] and "could not run" in note


def test_sanitizer_summary_note():
    step = gpu_check.Step("memcheck", 50, "sanitizer.log", [], note="kernel filter --kernel-name kns=ckv")
    tail = ["smoke: ok (cuda) in 9.1 s", "========= ERROR SUMMARY: 0 errors"]
    assert (gpu_check.outcome_note(step, tail, Path("."))
            == "smoke ok; ERROR SUMMARY: 0 errors; kernel filter --kernel-name kns=ckv")
    tail = ["========= Program hit cudaErrorNotSupported (error 801) on CUDA API call to cudaMallocAsync.",
            "========= ERROR SUMMARY: 1 error"]
    assert "1 CUDA API error reports" in gpu_check.outcome_note(step, tail, Path("."))


def test_kernels_all_live_in_the_filtered_namespace():
    """The sanitizer filter (kns=ckv) sees every chunkkv kernel only if each is declared inside namespace ckv."""
    for cu in sorted((ROOT / "src" / "cuda").glob("*.cu")):
        text = cu.read_text()
        opened, closed = text.find("namespace ckv {"), text.rfind("} // namespace ckv")
        kernels = [m.start() for m in re.finditer(r"__global__", text)]
        assert kernels and opened >= 0, cu.name
        assert all(opened < k < closed for k in kernels), f"{cu.name}: a kernel outside namespace ckv"


def test_summary_is_written_as_steps_end_and_a_kill_stops_the_running_step(tmp_path):
    """SIGTERM (the device tool's limit) mid-run: the finished steps' lines are on disk, the running step is
    marked INTERRUPTED, and its process group is gone."""
    out = tmp_path / "out"
    fast = [a for s in ("info", "build", "smoke", "timing") for a in ("--fake-sleep", f"{s}=0")]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--dry-run", "--quiet", "--out", str(out), *fast,
                             "--fake-sleep", "tests_gpu=120"], env=_env(CHUNKKV_SANITIZER="none"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = out / "tests_gpu.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and re.search(r"sleeping \d+", log.read_text())):  # printed by the step itself
            assert time.monotonic() < deadline, "the sleeping step never started"
            assert proc.poll() is None
            time.sleep(0.2)
        assert list(_step_lines(out)) == ["info", "build", "smoke", "timing"], "lines must be on disk already"
        sleeper = int(re.search(r"sleeping (\d+)", log.read_text()).group(1))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = _step_lines(out)
    assert "INTERRUPTED" in lines["tests_gpu"] and "memcheck" not in lines
    assert "# INTERRUPTED by signal" in (out / "summary.txt").read_text()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)


def test_timing_budget_skips_cases(tmp_path):
    """cuda_timing.py with its budget spent: the ceilings still come, every case is recorded as skipped."""
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_timing.py"), "--dry-run", "--budget-s", "0",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(ln) for ln in (tmp_path / "timing.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in recs] == ["env", "ceiling", "ceiling"] + ["skipped"] * 4
    assert "4 case(s) skipped" in r.stdout


def test_timing_case_that_raises_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    cuda_timing = _load("cuda_timing")
    real = cuda_timing.torch_select

    def broken(q, k, budget, chunk_size=10):
        if k.shape[2] == 256:
            raise RuntimeError("planted failure")
        return real(q, k, budget, chunk_size)

    monkeypatch.setattr(cuda_timing, "torch_select", broken)
    assert cuda_timing.main(["--dry-run", "--out", str(tmp_path)]) == 1
    recs = [json.loads(ln) for ln in (tmp_path / "timing.jsonl").read_text().splitlines()]
    errors = [(x["dtype"], x["L"]) for x in recs if x["kind"] == "error"]
    assert errors == [("bfloat16", 256), ("float16", 256)]
    assert sorted({(x["dtype"], x["L"]) for x in recs if x["kind"] == "op"}) == [("bfloat16", 640), ("float16", 640)]
    note = gpu_check.timing_note(tmp_path / "timing.jsonl")
    assert "CHECKS FAILED" in note and "bfloat16 256 raised RuntimeError: planted failure" in note
