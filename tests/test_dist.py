"""What the installed package offers: the public names, py.typed, a core that imports no loader, and the
chunkkv-eval command with its seven subcommands (the wheel itself: tools/check_wheel.sh)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chunkkv

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["niah", "longbench", "ruler", "gsm8k", "fidelity", "speed", "report"]


def test_dir_lists_the_lazy_names():
    names = dir(chunkkv)
    for name in ("patch", "unpatch", "ChunkKVPatch", "select", "gather", "compress", "build_info", "__version__"):
        assert name in names, name
    assert names == sorted(names)


def test_package_is_typed():
    assert (Path(chunkkv.__file__).parent / "py.typed").is_file()


def test_core_import_loads_no_loader_nor_transformers():
    code = ("import sys, chunkkv; chunkkv.select; "
            "bad = [m for m in ('transformers', 'torch', 'chunkkv.models', 'chunkkv.eval', 'chunkkv.patching', "
            "'gguf', 'tokenizers') if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_importing_the_loaders_changes_no_transformers_attribute():
    pytest.importorskip("transformers")
    import transformers.modeling_utils as modeling_utils

    before = {k: id(v) for k, v in vars(modeling_utils).items()}
    import chunkkv.eval.harness  # noqa: F401
    import chunkkv.models  # noqa: F401

    after = {k: id(v) for k, v in vars(modeling_utils).items()}
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"importing chunkkv's loaders replaced transformers.modeling_utils.{changed}"


def test_cli_lists_every_command(capsys):
    from chunkkv.eval import cli

    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(COMMANDS) == set(cli.COMMANDS)
    for cmd in COMMANDS:
        assert re.search(rf"^  {cmd} ", out, re.M), out


def test_cli_rejects_an_unknown_command(capsys):
    from chunkkv.eval import cli

    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    pytest.importorskip("transformers")
    from chunkkv.eval import cli

    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: chunkkv-eval {command}"), out[:200]


def test_console_script_is_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^chunkkv-eval = "chunkkv\.eval\.cli:main"$', text, re.M)


def test_no_sys_path_edits_in_the_evaluation_code():
    files = sorted((ROOT / "chunkkv" / "eval").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    assert files
    offenders = [f.name for f in files if "sys.path" in f.read_text(encoding="utf-8")]
    assert not offenders, offenders


def test_benchmarks_entry_point_runs_from_elsewhere(tmp_path):
    """python benchmarks/niah.py --help from another folder: the thin entry point imports the installed
    package (no checkout on sys.path is needed)."""
    pytest.importorskip("transformers")
    if not (ROOT / "benchmarks").is_dir():
        pytest.skip("no benchmarks/ folder (an unpacked sdist ships the package and its tests only)")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "niah.py"), "--help"], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage: chunkkv-eval niah" in r.stdout


def test_sdist_manifest_ships_what_the_build_and_tests_need():
    """MANIFEST.in: setup.py's CUDA helper, the license, every test helper (an sdist without them cannot
    build with CHUNKKV_CUDA=1 or run its tests)."""
    manifest = (ROOT / "MANIFEST.in").read_text()
    assert re.search(r"^include .*\bcuda_build\.py\b", manifest, re.M)
    assert re.search(r"^include .*\bLICENSE\b", manifest, re.M)
    for folder in ("src", "tests", "tests_gpu"):
        assert re.search(rf"^graft {folder}$", manifest, re.M), folder
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def _setup_version(cuda: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CHUNKKV_CUDA"}
    if cuda is not None:
        env["CHUNKKV_CUDA"] = cuda
    return subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def _nvcc_found() -> bool:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and Path(h, "bin", "nvcc").exists() for h in homes)


def test_setup_builds_cuda_only_when_asked():
    """setup.py: the default build is CPU (plain version) even with nvcc on PATH; CHUNKKV_CUDA=1 tags the
    version +cuNN; a bad value is refused by name."""
    pytest.importorskip("setuptools")
    default = _setup_version(None)
    assert default.returncode == 0, default.stderr[-2000:]
    assert default.stdout.strip().splitlines()[-1] == chunkkv.__version__
    bad = _setup_version("maybe")
    assert bad.returncode != 0 and "CHUNKKV_CUDA='maybe'" in bad.stderr + bad.stdout
    if _nvcc_found():
        cuda = _setup_version("1")
        assert cuda.returncode == 0, cuda.stderr[-2000:]
        assert re.fullmatch(re.escape(chunkkv.__version__) + r"\+cu\d+", cuda.stdout.strip().splitlines()[-1])
