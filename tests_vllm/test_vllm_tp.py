"""Tensor parallel 2 on CPU: every rank keeps the positions a single process keeps (tiny random Llama)."""
from __future__ import annotations

import collections
import json
import os
import tempfile

from oracle import run_engine

CONFIG = {"budget": 48, "window": 8, "chunk_size": 6, "reuse": 2}
SPEC = {"max_tokens": 4, "inprocess": False,
        "engine": {"dtype": "float32", "enforce_eager": True, "max_model_len": 1024, "seed": 0,
                   "additional_config": {"chunkkv": CONFIG}}}


def _selections(tp: int) -> dict:
    """(prompt, layer) -> {tp_rank: kept positions} recorded by the workers of a run with tp ranks."""
    from chunkkv.vllm.models import tiny_llama_folder
    from transformers import AutoTokenizer

    folder = tiny_llama_folder(layers=4, heads=4, kv_heads=2, head_dim=32)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "The lighthouse keeper Anna counted ships, storms and stars every night by the sea. "
    prompts = [tok(text * k).input_ids for k in (4, 9, 15)]
    with tempfile.TemporaryDirectory() as tmp:
        record = os.path.join(tmp, "record.jsonl")
        spec = {**SPEC, "model": folder, "prompts": prompts,
                "engine": {**SPEC["engine"], "tensor_parallel_size": tp}}
        env = {"CHUNKKV_VLLM_RECORD": record, "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        run_engine(spec, env=env)
        found: dict = collections.defaultdict(dict)
        with open(record) as f:
            for line in f:
                item = json.loads(line)
                found[(item["req"].split("-")[0], item["layer"])][item["tp_rank"]] = item["indices"]
    return dict(found)


def test_tensor_parallel_ranks_keep_the_single_process_selection():
    single = _selections(1)
    split = _selections(2)
    assert len(single) == 3 * 2  # 3 prompts, 2 reuse groups (leaders: layers 0 and 2)
    assert set(split) == set(single)
    for key, ranks in split.items():
        assert set(ranks) == {0, 1}, key
        assert ranks[0] == ranks[1] == single[key][0], key
