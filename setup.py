"""Build chunkkv._C from src/: the C core, its CPU kernels and the Python binding.

Environment knobs:
  CHUNKKV_CUDA=1        also build the CUDA kernels (nvcc must be found: CUDA_HOME, CUDA_PATH, /usr/local/cuda
                        or PATH); the version then carries a local tag, e.g. 0.1.0+cu13, so a CUDA wheel never
                        has the CPU wheel's name
  CHUNKKV_CUDA=auto     build them when nvcc is found (the old default)
  CHUNKKV_CUDA=0/unset  CPU only (the default: a release wheel or an sdist install never picks up nvcc by chance)
  CHUNKKV_SANITIZE=1    build with AddressSanitizer + UndefinedBehaviorSanitizer (for the hardening tests)
  CHUNKKV_NO_OPENMP=1   build without OpenMP (single-threaded kernels)
"""
from __future__ import annotations

import os
import re
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


def _cuda_mode() -> str:
    """"off", "on" or "auto" from CHUNKKV_CUDA (unset: off)."""
    raw = os.environ.get("CHUNKKV_CUDA", "0").strip().lower()
    if raw in ("", "0", "off", "no", "false"):
        return "off"
    if raw in ("1", "on", "yes", "true"):
        return "on"
    if raw == "auto":
        return "auto"
    raise SystemExit(f"chunkkv: CHUNKKV_CUDA={raw!r}: expected 0 (CPU only, the default), 1 (build CUDA) or auto")


def _search_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if d and (Path(d) / "nvcc").exists():
            return str(Path(d) / "nvcc")
    return None


def _find_nvcc() -> str | None:
    """nvcc when CUDA is asked for (CHUNKKV_CUDA=1 fails without it), else None."""
    mode = _cuda_mode()
    if mode == "off":
        return None
    nvcc = _search_nvcc()
    if nvcc is None and mode == "on":
        raise SystemExit("chunkkv: CHUNKKV_CUDA=1 but no nvcc in CUDA_HOME, CUDA_PATH, /usr/local/cuda or PATH")
    return nvcc


def _cuda_major(nvcc: str) -> str:
    """The CUDA major version of nvcc ("13"), for the local version tag."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.", out)
    if not m:
        raise SystemExit(f"chunkkv: could not read the CUDA version from `{nvcc} --version`")
    return m.group(1)


def _version() -> str:
    """chunkkv/__init__.py's __version__, plus +cuNN when the CUDA kernels are built."""
    text = (ROOT / "chunkkv" / "__init__.py").read_text(encoding="utf-8")
    version = re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)
    nvcc = _find_nvcc()
    return f"{version}+cu{_cuda_major(nvcc)}" if nvcc else version


class BuildExt(build_ext):
    """Adds the CUDA objects (compiled with nvcc) when CUDA is asked for (CHUNKKV_CUDA)."""

    def build_extensions(self) -> None:
        # Python's own link flags can carry -Wl,-rpath,<its lib folder> (pyenv, a self-built Python): the
        # extension needs no libpython, and an installed wheel must not search this machine's folders
        for attr in ("linker_so", "linker_so_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if isinstance(cmd, list):
                setattr(self.compiler, attr, [a for a in cmd if not a.startswith(("-Wl,-rpath", "-Wl,-R"))])
        ext = self.extensions[0]
        nvcc = _find_nvcc()
        cu_files = sorted((SRC / "cuda").glob("*.cu"))
        if nvcc and cu_files:
            from cuda_build import compile_cuda  # helper beside setup.py (shipped in the sdist: MANIFEST.in)

            objects, link_args = compile_cuda(nvcc, cu_files, Path(self.build_temp), sanitize=_sanitize())
            ext.extra_objects += objects
            ext.extra_link_args += link_args
            ext.define_macros.append(("CKV_WITH_CUDA", "1"))
        super().build_extensions()


def _sanitize() -> bool:
    return os.environ.get("CHUNKKV_SANITIZE", "0") == "1"


def _extension() -> Extension:
    # -ffp-contract=fast: ISO C mode would otherwise forbid fusing a*b+c into one FMA
    compile_args = ["-std=c11", "-O3", "-Wall", "-Wextra", "-fvisibility=hidden", "-ffp-contract=fast",
                    # __FILE__ and debug info name src/... instead of the build machine's folder
                    f"-ffile-prefix-map={ROOT}=."]
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
setup(version=_version(), ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
