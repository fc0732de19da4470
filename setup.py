"""Build chunkkv._C from src/: the C core, its CPU kernels and the Python binding.

Environment knobs:
  CHUNKKV_CUDA=0        never build the CUDA kernels (default: build them when nvcc is found)
  CHUNKKV_SANITIZE=1    build with AddressSanitizer + UndefinedBehaviorSanitizer (for the hardening tests)
  CHUNKKV_NO_OPENMP=1   build without OpenMP (single-threaded kernels)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"


def _c_sources() -> list[str]:
    files = sorted(SRC.glob("*.c")) + sorted((SRC / "cpu").glob("*.c")) + sorted((SRC / "py").glob("*.c"))
    return [str(p.relative_to(ROOT)) for p in files]


def _compiler_accepts(flag: str) -> bool:
    """Whether the C compiler builds and links a tiny program with `flag`."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <omp.h>\nint main(void){return omp_get_max_threads() < 0;}\n"
                       if "openmp" in flag else "int main(void){return 0;}\n")
        r = subprocess.run([cc, flag, str(src), "-o", str(Path(tmp) / "probe")], capture_output=True)
        return r.returncode == 0


def _find_nvcc() -> str | None:
    if os.environ.get("CHUNKKV_CUDA", "1") == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and (Path(d) / "nvcc").exists():
            return str(Path(d) / "nvcc")
    return None


class BuildExt(build_ext):
    """Adds the CUDA objects (compiled with nvcc) when nvcc is present."""

    def build_extensions(self) -> None:
        ext = self.extensions[0]
        nvcc = _find_nvcc()
        cu_files = sorted((SRC / "cuda").glob("*.cu"))
        if nvcc and cu_files:
            from cuda_build import compile_cuda  # local helper beside setup.py

            objects, link_args = compile_cuda(nvcc, cu_files, Path(self.build_temp), sanitize=_sanitize())
            ext.extra_objects += objects
            ext.extra_link_args += link_args
            ext.define_macros.append(("CKV_WITH_CUDA", "1"))
        super().build_extensions()


def _sanitize() -> bool:
    return os.environ.get("CHUNKKV_SANITIZE", "0") == "1"


def _extension() -> Extension:
    # -ffp-contract=fast: ISO C mode would otherwise forbid fusing a*b+c into one FMA
    compile_args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden", "-ffp-contract=fast"]
    link_args: list[str] = []
    if os.environ.get("CHUNKKV_NO_OPENMP", "0") != "1" and _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    if _sanitize():
        # float-cast-overflow (a double -> int64 cast out of range) is not part of "undefined" in gcc
        san = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-omit-frame-pointer",
               "-fno-sanitize-recover=undefined,float-cast-overflow", "-O1", "-g"]
        compile_args += san
        link_args += ["-fsanitize=address,undefined,float-cast-overflow"]
    return Extension(
        "chunkkv._C",
        sources=_c_sources(),
        include_dirs=[str(SRC)],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        depends=[str(p.relative_to(ROOT)) for pat in ("*.h", "*.cuh", "*.cu") for p in SRC.rglob(pat)],
    )


sys.path.insert(0, str(ROOT))
setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
