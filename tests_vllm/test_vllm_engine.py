"""vLLM + chunkkv against transformers + chunkkv.patch, on SmolLM2-135M-Instruct (greedy, fp32).

Engines are started once per session (conftest.engine_result), each in its own process.
"""
from __future__ import annotations

import pytest

from conftest import PREEMPT_BLOCKS, engine_result, hf_tokens, prompts


def as_tuples(outputs):
    return tuple(tuple(o) if o is not None else None for o in outputs)


def test_uncompressed_vllm_equals_transformers():
    """The oracle checks itself: without chunkkv, vLLM gives transformers' tokens (and vLLM's own scheduler)."""
    result = engine_result("full")
    assert as_tuples(result["outputs"]) == hf_tokens("full")
    assert result["preemptions"] is None  # no chunkkv key: vLLM's own scheduler, nothing of chunkkv runs
    assert result["compactions"] is None


@pytest.mark.parametrize("name", ["A", "B"])
def test_compressed_vllm_equals_patched_transformers(name):
    result = engine_result(name)
    expected = hf_tokens(name)
    assert as_tuples(result["outputs"]) == expected
    # the comparison can fail: compression changes the continuation of some prompts
    assert any(e != f for e, f in zip(expected, hf_tokens("full")))
    # every prompt longer than its budget was compacted in all 30 layers; the short one was kept whole
    lengths = [len(p) for p in prompts()]
    assert len(result["dropped_seen"]) == len(lengths) - 1
    assert result["compactions"] == 30 * (len(lengths) - 1)
    assert sorted(result["dropped_seen"].values()) == sorted(
        n - kept for n in lengths if (kept := _kept(name, n)) is not None)
    assert result["free_blocks_end"] == result["free_blocks_start"]
    assert result["dropped_left"] == {}


def _kept(name, n):
    from chunkkv.vllm.config import parse
    from conftest import CONFIG_A, CONFIG_B

    return parse({"chunkkv": {"A": CONFIG_A, "B": CONFIG_B}[name]}).kept_tokens(n)


def test_freeing_tail_blocks_is_exact():
    """The same batch with the tail blocks kept allocated gives the same tokens; both return every block."""
    freed, kept = engine_result("B"), engine_result("B_keep_tail")
    assert kept["outputs"] == freed["outputs"]
    assert kept["free_blocks_end"] == kept["free_blocks_start"]
    assert freed["free_blocks_end"] == freed["free_blocks_start"]


def test_preemption_and_abort():
    """A KV space too small for every request at once: preempted requests are recomputed (prompt first, then
    its outputs over the compacted cache) and give the uncontended tokens; an aborted request returns its
    blocks like the finished ones."""
    result = engine_result("P_preempt")
    reference = engine_result("P_uncontended")
    assert reference["preemptions"] == 0
    assert result["total_blocks"] == PREEMPT_BLOCKS
    assert result["preemptions"] > 0
    assert result["outputs"][2] is None and reference["outputs"][2] is not None  # aborted
    for i, (got, want) in enumerate(zip(result["outputs"], reference["outputs"])):
        if i != 2:
            assert got == want, f"prompt {i}"
    assert result["free_blocks_end"] == result["free_blocks_start"]
    assert result["dropped_left"] == {}
