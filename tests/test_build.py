"""What the build reports about itself."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import chunkkv


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version("chunkkv")
    except importlib.metadata.PackageNotFoundError:  # built in place, not installed
        return None


def test_build_reports_cuda_as_the_version_says():
    """setup.py builds CUDA only when asked (CHUNKKV_CUDA=1), and then tags the version +cuNN: a CPU build
    never picks up nvcc by chance, and a CUDA build never carries the CPU build's name."""
    version = _installed_version()
    if version is None:
        pytest.skip("chunkkv is not installed (an in-place build): no version to compare with")
    got = chunkkv.build_info()["cuda"]
    assert got is ("+cu" in version), (
        f"build_info()['cuda'] is {got}, but the installed version is {version}: was chunkkv rebuilt in place "
        "after the install? Reinstall it (pip install -e ., CHUNKKV_CUDA=1 for the CUDA kernels)")


def test_build_info_fields():
    info = chunkkv.build_info()
    assert set(info) >= {"version", "cuda", "openmp", "simd", "threads"}
    assert isinstance(info["cuda"], bool) and info["version"] == chunkkv.__version__


LEVELS = ["avx512-bf16", "avx512", "avx2", "baseline"]


def test_simd_level_is_known():
    assert chunkkv.build_info()["simd"] in LEVELS


@pytest.mark.parametrize("level", LEVELS[1:])
def test_every_vector_level_matches_the_reference(level):
    """CHUNKKV_SIMD lowers the kernels' level; each level's scores and selections must match the reference
    (test_score.py's random cases, in a child process that reads the variable)."""
    env = dict(os.environ, CHUNKKV_SIMD=level)
    here = Path(__file__).parent
    shown = subprocess.run([sys.executable, "-c", "import chunkkv; print(chunkkv.build_info()['simd'])"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    best = chunkkv.build_info()["simd"]
    # the level asked for, or the CPU's best when that is lower
    assert shown == LEVELS[max(LEVELS.index(level), LEVELS.index(best))]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(here / "test_score.py"), "-k", "random"],
                         env=env, capture_output=True, text=True, cwd=here.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_fma_peak_is_measured():
    one = chunkkv.ops.fma_peak_gflops(1, 0.05)
    assert 0.1 < one < 1e5  # GFLOP/s of one core: positive and finite
