#!/usr/bin/env bash
# One prepared GPU check for a short loan of a CUDA machine (the lent H200: Python 3.12 with
# torch 2.11+cu130, nvcc 13.0, pytest and pytest-xdist, no network). Fits in under 8 minutes:
#
#   1. build: CHUNKKV_CUDA=1 pip install -e . (nvcc; no build isolation, no downloads); build_info()["cuda"] must be True
#   2. tests_gpu/: the CUDA kernels against the CPU core and the reference        (time-boxed 210 s)
#   3. tests_gpu/smoke.py, then under compute-sanitizer memcheck and racecheck     (time-boxed 3 x 60 s)
#   4. the core tests on the CPU: tests/test_{build,score,select,gather,methods}.py (time-boxed 120 s)
#   5. benchmarks/speed.py --device cuda, if the script exists and takes --device  (time-boxed 150 s)
#
# Run from anywhere:  bash benchmarks/gpu_check.sh
# Logs and results go to $OUT (the device tool's return folder) when set, else benchmarks/results/gpu_check/.
# The exit status is non-zero when any step failed; a summary table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$LOGS" benchmarks/results
rm -f "$LOGS"/*.log "$LOGS"/summary.txt
SUMMARY=()
FAILED=0
T_START=$(date +%s)

step() { echo; echo "=== $1  (t+$(( $(date +%s) - T_START ))s)"; }
record() {  # name, status, seconds; a sanitizer that runs out of time is reported, not failed
    local mark=ok
    if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then
        mark="TIMED OUT"
        [[ $1 == sanitizer* ]] || FAILED=1
    elif [ "$2" -ne 0 ]; then
        mark="FAILED ($2)"
        FAILED=1
    fi
    SUMMARY+=("$(printf '%-24s %-12s %5ss' "$1" "$mark" "$3")")
}
run_step() {  # name, timeout seconds, log file (appended), command...
    local name=$1 limit=$2 log=$3; shift 3
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    record "$name" "$rc" "$(( $(date +%s) - t0 ))"
    return 0
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | head -3
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| gpus', torch.cuda.device_count())"
command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not on PATH (setup.py also looks in CUDA_HOME, CUDA_PATH, /usr/local/cuda)"

step "build (CHUNKKV_CUDA=1 pip install -e ., CUDA objects with nvcc)"
t0=$(date +%s)
CHUNKKV_CUDA=1 "$PY" -m pip install -e . --no-build-isolation --no-deps -v >"$LOGS/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then  # an old pip or setuptools without PEP 660 editables: build in place instead
    echo "pip install -e failed (exit $rc); trying setup.py build_ext --inplace" | tee -a "$LOGS/build.log"
    CHUNKKV_CUDA=1 "$PY" setup.py build_ext --inplace >>"$LOGS/build.log" 2>&1
    rc=$?
fi
grep -E "chunkkv: |nvcc .*error|warning|Error" "$LOGS/build.log" | grep -v "Running pip as\|Deprecat\|license" | tail -20
if ! "$PY" -c "import chunkkv; info = chunkkv.build_info(); print(info); assert info['cuda'], 'built without CUDA'"; then
    [ $rc -eq 0 ] && rc=1
fi
record "build" "$rc" "$(( $(date +%s) - t0 ))"
if [ "$rc" -ne 0 ]; then
    tail -40 "$LOGS/build.log"
    echo "build failed: nothing else can run"; printf '%s\n' "${SUMMARY[@]}"; exit 1
fi

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)

step "tests_gpu (CUDA vs CPU core vs reference)"
run_step "tests_gpu" 210 "$LOGS/tests_gpu.log" "$PY" -m pytest tests_gpu -q -ra --durations=8 -p no:cacheprovider "${XDIST[@]}"

step "compute-sanitizer on tests_gpu/smoke.py"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
      /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
run_step "smoke" 60 "$LOGS/sanitizer.log" "$PY" tests_gpu/smoke.py
if [ -n "$SAN" ]; then
    run_step "sanitizer memcheck" 60 "$LOGS/sanitizer.log" \
        "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 "$PY" tests_gpu/smoke.py
    run_step "sanitizer racecheck" 60 "$LOGS/sanitizer.log" \
        "$SAN" --tool racecheck --error-exitcode 9 --print-limit 20 "$PY" tests_gpu/smoke.py
else
    echo "compute-sanitizer not found: skipped"
fi

step "core tests (CPU paths)"
CORE=()
for t in tests/test_build.py tests/test_score.py tests/test_select.py tests/test_gather.py tests/test_methods.py; do
    [ -f "$t" ] && CORE+=("$t")
done
run_step "core tests" 120 "$LOGS/core_tests.log" "$PY" -m pytest "${CORE[@]}" -q -p no:cacheprovider "${XDIST[@]}"

step "speed (benchmarks/speed.py --device cuda)"
if [ -f benchmarks/speed.py ] && "$PY" benchmarks/speed.py --help 2>/dev/null | grep -q -- "--device"; then
    run_step "speed" 150 "$LOGS/speed.log" "$PY" benchmarks/speed.py --device cuda --json benchmarks/results/speed_gpu.json
    [ -f benchmarks/results/speed_gpu.json ] && [ -n "${OUT:-}" ] && cp benchmarks/results/speed_gpu.json "$OUT/"
else
    echo "benchmarks/speed.py is missing or takes no --device: skipped"
fi

step "summary"
[ -f "$LOGS/sanitizer.log" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS/sanitizer.log"
grep -E "passed|failed" "$LOGS"/tests_gpu.log "$LOGS"/core_tests.log 2>/dev/null | tail -2
printf '%s\n' "${SUMMARY[@]}" | tee "$LOGS/summary.txt"
echo "total $(( $(date +%s) - T_START ))s; logs in $LOGS"
exit $FAILED
