#!/usr/bin/env bash
# Install a built chunkkv wheel (default: the newest manylinux wheel in wheelhouse/) with its eval extra in a
# fresh virtual environment and use it from a folder outside the source tree: import, the chunkkv-eval
# command, the thin benchmarks/ entry points, core tests against the installed package, and (when the
# stories260K model is found) one tiny NIAH run with the built-in filler haystack.
#
#   bash tools/check_wheel.sh [WHEEL]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHEEL=$(realpath "${1:-$(ls -t "$ROOT"/wheelhouse/chunkkv-*manylinux*.whl | head -1)}")
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "== $WHEEL in a clean venv ($WORK/venv)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
# torch first: torch==2.13.0 is a CPU build from a local file on this project's machines (elsewhere, the
# PyTorch CPU index: pip install torch --index-url https://download.pytorch.org/whl/cpu)
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "$WHEEL[eval,test]"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
"$VPY" - "$ROOT" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np

import chunkkv

root = Path(sys.argv[1]).resolve()
where = Path(chunkkv.__file__).resolve()
assert root not in where.parents, f"chunkkv imported from the source tree: {where}"
assert "patch" in dir(chunkkv), "patch missing from dir(chunkkv)"
assert (where.parent / "py.typed").is_file(), "py.typed missing"
import importlib.metadata

info = chunkkv.build_info()
version = importlib.metadata.version("chunkkv")
assert info["openmp"] and info["cuda"] == ("+cu" in version), (version, info)  # CUDA only in a +cuNN wheel
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 4, 8, 16), dtype=np.float32)
k = rng.standard_normal((1, 2, 200, 16), dtype=np.float32)
idx = chunkkv.select(q, k, budget=40, chunk_size=10)
assert idx.shape == (1, 40), idx.shape
print(f"import ok from {where.parent}: chunkkv {version}, {info}")
PYEOF
"$WORK/venv/bin/chunkkv-eval" --help >/dev/null
for cmd in niah longbench ruler gsm8k fidelity speed report; do
    "$WORK/venv/bin/chunkkv-eval" "$cmd" --help >/dev/null
done
echo "chunkkv-eval and its 7 commands: --help ok"
# the thin entry points in benchmarks/ import the installed package, not the checkout
"$VPY" "$ROOT/benchmarks/niah.py" --help >/dev/null
# a few test files against the installed package (pytest puts tests/, not the checkout, on sys.path)
(cd "$ROOT/tests" && "$VPY" -c "import chunkkv, sys; assert '$WORK/venv' in chunkkv.__file__, chunkkv.__file__" &&
    "$VPY" -m pytest -q -p no:cacheprovider test_errors.py test_dlpack.py test_metrics.py \
    test_dist.py test_build.py -k "not every_vector_level")
STORIES=${CHUNKKV_STORIES260K:-${CHUNKKV_SHARED:-$ROOT/../shared}/models/stories260K}
if [ -f "$STORIES/stories260K.bin" ]; then
    env -u CHUNKKV_SHARED OMP_NUM_THREADS=1 "$WORK/venv/bin/chunkkv-eval" niah --model "$STORIES" --lengths 200 \
        --depths 50 --methods full,chunkkv --budgets 48 --max-new-tokens 4 --out "$WORK/elsewhere/niah.json" \
        --quiet --threads 1
    "$VPY" - <<'PYEOF'
import json

data = json.load(open("niah.json"))
assert data["config"]["haystack"] == "filler", data["config"]  # no files needed by default
assert len(data["results"]) == 2, data["results"]  # full and chunkkv at budget 48
print("niah from the wheel: ok")
PYEOF
elif [ "${CI:-}" = "true" ]; then
    echo "error: $STORIES/stories260K.bin not found (CI needs ../shared)" >&2
    exit 1
else
    echo "stories260K not found at $STORIES: tiny NIAH run skipped"
fi
echo "== wheel check passed: $WHEEL"
