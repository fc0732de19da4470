#!/usr/bin/env bash
# Run tests/valgrind_smoke.py (every entry point, success and error paths) under valgrind memcheck and
# fail on any definite leak or memory error whose stack passes through chunkkv's _C extension.
# CPython's and NumPy's own reports (interned objects, arenas kept to exit) are filtered out.
#
#   tests/valgrind_smoke.sh            # uses the chunkkv that `python3 -c "import chunkkv"` finds
#
# Environment: PYTHON (default python3), VALGRIND (default valgrind), CHUNKKV_VALGRIND_LOG (keep the log there).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
PY="$("$PY" -c 'import sys; print(sys.executable)')"  # the interpreter itself, not a pyenv/venv shim script
VG="${VALGRIND:-valgrind}"
command -v "$VG" >/dev/null || { echo "valgrind_smoke.sh: valgrind not found (apt-get install valgrind)" >&2; exit 2; }
LOG="${CHUNKKV_VALGRIND_LOG:-$(mktemp "${TMPDIR:-/tmp}/chunkkv-valgrind.XXXXXX")}"
so="$("$PY" -c 'import chunkkv._C as c; print(c.__file__)')"
echo "valgrind_smoke.sh: checking $so"

t0=$SECONDS
# PYTHONMALLOC=malloc: every Python allocation goes through malloc, where memcheck sees it.
# OMP_WAIT_POLICY=passive: idle OpenMP threads sleep instead of spinning (memcheck runs one thread at a time).
set +e
PYTHONMALLOC=malloc OMP_WAIT_POLICY=passive "$VG" --tool=memcheck --leak-check=full --show-leak-kinds=definite \
    --errors-for-leak-kinds=definite --num-callers=40 --log-file="$LOG" \
    "$PY" "$ROOT/tests/valgrind_smoke.py"
rc=$?
set -e
echo "valgrind_smoke.sh: valgrind ran $((SECONDS - t0)) s, exit $rc"

status=0
"$PY" - "$LOG" <<'EOF' || status=$?
"""Split the memcheck log into records and keep those that involve chunkkv's extension."""
import re
import sys

text = open(sys.argv[1]).read()
lines = [re.sub(r"^==\d+== ?", "", l) for l in text.splitlines() if re.match(r"^==\d+==", l)]
records, cur = [], []
for l in lines:
    if l.strip() == "":
        if cur:
            records.append(cur)
        cur = []
    else:
        cur.append(l)
if cur:
    records.append(cur)

ours = re.compile(r"chunkkv|_C\.cpython|ckv_|/src/(ops|cpu/|py/)")
kinds = re.compile(r"^(Invalid (read|write|free)|Mismatched free|Conditional jump|Use of uninitialised|"
                   r"Syscall param|Source and destination overlap|Argument '.*' of function|"
                   r".*definitely lost in loss record)")
found = [r for r in records if kinds.match(r[0]) and any(ours.search(l) for l in r[1:])]
summary = {}
for key in ("definitely lost", "indirectly lost", "possibly lost"):
    m = re.search(key + r": ([\d,]+) bytes in ([\d,]+) blocks", text)
    summary[key] = m.group(1) + " bytes" if m else "0 bytes"
m = re.search(r"ERROR SUMMARY: (\d+) errors", text)
print(f"valgrind_smoke.sh: whole process: {m.group(1) if m else '?'} errors, "
      + ", ".join(f"{k} {v}" for k, v in summary.items()) + " (CPython's and NumPy's included)")
if found:
    for r in found:
        print("\n".join(r[:30]), "\n")
    print(f"valgrind_smoke.sh: {len(found)} report(s) in chunkkv's _C")
    sys.exit(1)
print("valgrind_smoke.sh: no definite leak and no invalid access in chunkkv's _C")
EOF
if [[ -z "${CHUNKKV_VALGRIND_LOG:-}" ]]; then rm -f "$LOG"; fi
if [[ $rc -ne 0 && $status -eq 0 ]]; then
    # valgrind exits with the program's status: the smoke script itself failed
    echo "valgrind_smoke.sh: the smoke script failed under valgrind (exit $rc)" >&2
    exit "$rc"
fi
exit $status
