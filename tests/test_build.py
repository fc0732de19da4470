"""What the build reports about itself."""
from __future__ import annotations

import os
from pathlib import Path

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
