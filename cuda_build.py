"""Compile chunkkv's CUDA kernels (src/cuda/*.cu) with nvcc, for setup.py.

compile_cuda(nvcc, cu_files, build_temp, sanitize=False) -> (objects, link_args)

Each .cu becomes one object with machine code for sm_80 and sm_90 plus compute_90 PTX
(which newer GPUs JIT-compile). The files compile in parallel, up to one nvcc per CPU
core, and each nvcc spreads its three targets over the cores left (--threads). The CUDA
runtime is linked statically (libcudart_static.a), so the extension needs only the
driver (libcuda.so) at run time, and loads without one: cudart looks for the driver
only at the first CUDA call, which happens only for CUDA tensors.

Environment knobs: CHUNKKV_NVCC_FLAGS (extra flags, split on spaces),
CHUNKKV_CUDA_ARCHS (e.g. "80;90": replaces the default targets, PTX for the last).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent

DEFAULT_ARCHS = ("80", "90")


def _arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("CHUNKKV_CUDA_ARCHS", "").replace(",", ";").split(";") if a.strip()]
    archs = archs or list(DEFAULT_ARCHS)
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def cuda_lib_dir(nvcc: str) -> Path:
    """The folder holding libcudart_static.a for this nvcc (resolving wrapper scripts and links)."""
    nvcc_path = Path(nvcc).resolve()
    homes = [nvcc_path.parent.parent]
    try:  # a wrapper script (e.g. /usr/local/bin/nvcc -> exec /usr/local/cuda-X/bin/nvcc): ask nvcc itself
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if "TOP=" in line:
                homes.insert(0, Path(line.split("TOP=", 1)[1].strip()).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            homes.append(Path(os.environ[env]))
    homes.append(Path("/usr/local/cuda"))
    for home in homes:
        for sub in ("lib64", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib", "lib"):
            if (home / sub / "libcudart_static.a").exists():
                return home / sub
    raise RuntimeError(f"chunkkv: found nvcc at {nvcc} but no libcudart_static.a beside it "
                       f"(looked in {', '.join(str(h) for h in homes)}); set CHUNKKV_CUDA=0 for a CPU-only build")


def _compile_one(nvcc: str, cu: Path, obj: Path, flags: list[str]) -> tuple[Path, float]:
    cmd = [nvcc, "-c", str(cu), "-o", str(obj)] + flags
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.stdout:
        print(r.stdout, end="", flush=True)
    if r.stderr:
        print(r.stderr, end="", file=sys.stderr, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"chunkkv: nvcc failed on {cu.name} (exit {r.returncode}); "
                           "set CHUNKKV_CUDA=0 for a CPU-only build")
    return obj, time.perf_counter() - t0


def compile_cuda(nvcc: str, cu_files, build_temp, sanitize: bool = False) -> tuple[list[str], list[str]]:
    """Compile each .cu to an object; return (object paths, linker arguments for a static cudart)."""
    cu_files = [Path(f) for f in cu_files]
    out_dir = Path(build_temp) / "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "--expt-relaxed-constexpr",
             "-I", str(ROOT / "src"),
             "-Xcompiler", f"-ffile-prefix-map={ROOT}=."] + _arch_flags()  # no build folder in the .so
    if sanitize:  # debuggable host code and line info in the kernels (compute-sanitizer); no ASan in .cu
        flags += ["-O1", "-g", "-lineinfo", "-Xcompiler", "-fno-omit-frame-pointer"]
    else:
        flags += ["-O3"]
    flags += shlex.split(os.environ.get("CHUNKKV_NVCC_FLAGS", ""))
    cores = os.cpu_count() or 1
    jobs = max(1, min(len(cu_files), cores))
    flags += ["--threads", str(max(1, cores // jobs))]  # the three targets of one file in parallel

    t0 = time.perf_counter()
    newest_header = max((p.stat().st_mtime for p in (ROOT / "src").rglob("*.h*")), default=0.0)
    todo, objects = [], []
    for cu in cu_files:
        obj = out_dir / (cu.stem + ".o")
        objects.append(str(obj))
        stale = not obj.exists() or obj.stat().st_mtime < max(cu.stat().st_mtime, newest_header)
        flag_file = obj.with_suffix(".flags")
        if not stale and (not flag_file.exists() or flag_file.read_text() != " ".join(flags)):
            stale = True
        if stale:
            todo.append((cu, obj))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for obj, secs in pool.map(lambda co: _compile_one(nvcc, co[0], co[1], flags), todo):
            obj.with_suffix(".flags").write_text(" ".join(flags))
            print(f"chunkkv: {obj.name} compiled in {secs:.1f} s", flush=True)
    if todo:
        print(f"chunkkv: CUDA objects built in {time.perf_counter() - t0:.1f} s "
              f"({len(todo)} files, {jobs} at a time)", flush=True)

    lib = cuda_lib_dir(nvcc)
    link_args = [f"-L{lib}", "-lcudart_static", "-ldl", "-lpthread", "-lrt", "-lstdc++"]
    return objects, link_args
