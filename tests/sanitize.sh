#!/usr/bin/env bash
# Build chunkkv._C with AddressSanitizer + UndefinedBehaviorSanitizer (setup.py: CHUNKKV_SANITIZE=1)
# into a scratch copy of this repository and run the core tests and the hardening fuzz against it.
# Any ASan or UBSan report aborts the process and fails this script.
#
#   tests/sanitize.sh                 # the default selection (a few minutes)
#   tests/sanitize.sh tests/test_x.py # or pytest arguments of your own (paths relative to the repo)
#
# Environment: PYTHON (default python3), CC (default: Python's compiler),
#   CHUNKKV_FUZZ_EXAMPLES (fuzz size here, default 2500), CHUNKKV_SANITIZE_KEEP=1 (keep the build dir).
# Needs gcc's (or clang's) libasan and libubsan: on Debian/Ubuntu `apt-get install gcc` brings them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CC_BIN="${CC:-$("$PY" -c 'import sysconfig; print((sysconfig.get_config_var("CC") or "cc").split()[0])')}"
ASAN_LIB="$("$CC_BIN" -print-file-name=libasan.so)"
UBSAN_LIB="$("$CC_BIN" -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    if [[ ! -e "$lib" ]]; then
        echo "sanitize.sh: $CC_BIN has no $(basename "$lib") (install gcc's sanitizer runtimes, e.g. libasan8 libubsan1)" >&2
        exit 2
    fi
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/chunkkv-asan.XXXXXX")"
cleanup() { if [[ "${CHUNKKV_SANITIZE_KEEP:-0}" != 1 ]]; then rm -rf "$WORK"; else echo "kept $WORK"; fi; }
trap cleanup EXIT

# 1. a copy of the sources (no build outputs), built in place with the sanitizers and without CUDA
extra=()
for f in cuda_build.py README.md LICENSE; do [[ -e "$ROOT/$f" ]] && extra+=("$f"); done
(cd "$ROOT" && tar -cf - --exclude='*.so' --exclude='__pycache__' --exclude='build' --exclude='*.egg-info' \
    --exclude='.hypothesis' setup.py pyproject.toml src chunkkv tests "${extra[@]}") | tar -xf - -C "$WORK"
t0=$SECONDS
if ! (cd "$WORK" && CHUNKKV_SANITIZE=1 CHUNKKV_CUDA=0 CC="$CC_BIN" "$PY" setup.py -q build_ext --inplace) \
        >"$WORK/build.log" 2>&1; then
    cat "$WORK/build.log" >&2
    echo "sanitize.sh: the sanitizer build failed" >&2
    exit 1
fi
SO="$(ls "$WORK"/chunkkv/_C*.so)"
# ldd's output is read whole before grep: `ldd | grep -q` under pipefail fails when grep exits at its match while
# ldd still writes (SIGPIPE, status 141), which read as "not linked" once on a loaded CI machine.
needed="$(ldd "$SO")"
if ! grep -q libasan <<<"$needed"; then
    echo "sanitize.sh: $SO is not linked with libasan: CHUNKKV_SANITIZE=1 had no effect" >&2
    exit 1
fi
echo "sanitize.sh: built $SO with ASan+UBSan in $((SECONDS - t0)) s"

# 2. the runtime: ASan must be the first library loaded (Python itself is not instrumented).
#    detect_leaks=0: CPython and torch keep memory to exit; tests/valgrind_smoke.sh checks leaks.
#    allocator_may_return_null=1: absurd sizes in the fuzz must come back as MemoryError, not an abort.
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:print_summary=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:print_summary=1"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export CHUNKKV_FUZZ_EXAMPLES="${CHUNKKV_FUZZ_EXAMPLES:-2500}"
export PYTHONDONTWRITEBYTECODE=1

where="$(cd "$WORK" && "$PY" -c 'import chunkkv, os; print(os.path.dirname(chunkkv._C.__file__))')"
if [[ "$where" != "$WORK/chunkkv" ]]; then
    echo "sanitize.sh: imported chunkkv from $where, not from the sanitizer build in $WORK" >&2
    exit 1
fi

# 3. the tests: the core-op suites that exist, and the hardening fuzz and thread tests (the leak tests
#    measure resident memory, which ASan's quarantine inflates, and the model tests are pure Python)
if [[ $# -gt 0 ]]; then
    args=("$@")
else
    args=()
    for f in test_score.py test_select.py test_gather.py test_dlpack.py test_errors.py test_methods.py; do
        [[ -e "$WORK/tests/$f" ]] && args+=("tests/$f")
    done
    args+=(tests/test_hardening.py -k "not leak and not patch")
fi
t0=$SECONDS
cd "$WORK"
"$PY" -m pytest -q -p no:cacheprovider "${args[@]}"
echo "sanitize.sh: clean under ASan+UBSan ($((SECONDS - t0)) s of tests)"
