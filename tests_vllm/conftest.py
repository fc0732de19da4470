"""Shared engine runs for the vLLM tests: each engine starts once per session, in its own process."""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle import hf_greedy, run_engine  # noqa: E402

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI") == "true":
        raise RuntimeError("tests_vllm: vLLM is not installed in this environment (required on CI)")
    pytest.skip("vLLM is not installed (see README: chunkkv[vllm])", allow_module_level=True)

MAX_TOKENS = 16
MAX_MODEL_LEN = 1024
#: budgets of the two compressed engines (reuse 1 and reuse 2)
CONFIG_A = {"budget": 64, "window": 16, "chunk_size": 8, "reuse": 1}
CONFIG_B = {"keep_ratio": 0.25, "window": 16, "chunk_size": 10, "reuse": 2}
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": MAX_MODEL_LEN, "seed": 0}
STORY = ("Once upon a time in a small village by the sea, there lived an old fisherman named Tom. Every evening "
         "he told the children about the storm of 1953, the lighthouse keeper Anna and her dog Pepper. ")


@functools.lru_cache(maxsize=None)
def smollm2() -> str:
    from chunkkv.vllm.models import smollm2_folder

    return smollm2_folder()


@functools.lru_cache(maxsize=None)
def hf_model():
    from chunkkv.models import load_model

    return load_model(smollm2(), attn_implementation="eager")


@functools.lru_cache(maxsize=None)
def prompts() -> tuple[tuple[int, ...], ...]:
    """Six prompts of 30 to ~560 tokens (the first is shorter than every budget: kept whole)."""
    _, tok = hf_model()
    texts = ["Say hello:"] + [f"Story: {STORY * k} Question: who is Pepper? Answer:" for k in (2, 5, 8, 11, 14)]
    return tuple(tuple(tok(t).input_ids) for t in texts)


@functools.lru_cache(maxsize=None)
def engine_result(name: str) -> dict:
    """The run of one named engine (started at most once per session)."""
    spec = {"model": smollm2(), "max_tokens": MAX_TOKENS, "prompts": [list(p) for p in prompts()],
            "engine": dict(ENGINE)}
    if name == "full":
        pass
    elif name == "A":
        spec["engine"]["additional_config"] = {"chunkkv": CONFIG_A}
    elif name == "B":
        spec["engine"]["additional_config"] = {"chunkkv": CONFIG_B}
    elif name == "B_keep_tail":
        spec["engine"]["additional_config"] = {"chunkkv": {**CONFIG_B, "free_tail": False}}
    elif name in ("P_uncontended", "P_preempt"):
        # nine requests of 101-371 tokens, 96 outputs each: compressed, they are admitted quickly and then
        # outgrow a pool of 24 blocks of 32 tokens (the least that holds max_model_len), so some are preempted
        spec["prompts"] = [list(p) for p in prompts()[1:4]] * 3
        spec["max_tokens"] = 96
        spec["engine"].update(max_model_len=704, block_size=32, additional_config={"chunkkv": CONFIG_B})
        if name == "P_preempt":
            spec["engine"]["num_gpu_blocks_override"] = PREEMPT_BLOCKS
            spec["abort"] = {"prompt": 2, "after_steps": 3}
    else:
        raise KeyError(name)
    return run_engine(spec)


PREEMPT_BLOCKS = 24


@functools.lru_cache(maxsize=None)
def hf_tokens(config_name: str) -> tuple[tuple[int, ...], ...]:
    from chunkkv.vllm.config import parse

    model, _ = hf_model()
    patch = None
    if config_name != "full":
        patch = parse({"chunkkv": {"A": CONFIG_A, "B": CONFIG_B}[config_name]}).patch_kwargs()
    return tuple(tuple(hf_greedy(model, list(p), MAX_TOKENS, patch)) for p in prompts())
