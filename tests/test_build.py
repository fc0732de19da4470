"""What the build reports about itself."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import chunkkv


def _nvcc_present() -> bool:
    """setup.py's rule (_find_nvcc): CHUNKKV_CUDA=0 turns CUDA off; otherwise nvcc in CUDA_HOME,
    CUDA_PATH or /usr/local/cuda, or on PATH."""
    if os.environ.get("CHUNKKV_CUDA", "1") == "0":
        return False
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return True
    return any(d and (Path(d) / "nvcc").exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def test_build_reports_cuda_when_nvcc_present():
    want = _nvcc_present()
    got = chunkkv.build_info()["cuda"]
    assert got is want, (
        f"build_info()['cuda'] is {got}, but nvcc is {'' if want else 'not '}found here and CHUNKKV_CUDA is "
        f"{os.environ.get('CHUNKKV_CUDA', 'unset')}: was chunkkv built in another environment? "
        "Reinstall it (pip install -e .)")


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
