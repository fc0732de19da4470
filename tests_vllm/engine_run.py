"""Run one vLLM engine on a JSON spec and write what it did as JSON (the tests start each engine in its own
process: vLLM's global state does not allow two engines per process).

    python tests_vllm/engine_run.py SPEC.json OUT.json

spec: {"model": path, "engine": {LLM kwargs}, "max_tokens": n, "prompts": [[token ids], ...],
       "abort": {"prompt": i, "after_steps": s} (optional), "inprocess": true}
out:  {"outputs": [[token ids] or null (aborted)], "free_blocks_start", "free_blocks_end", "total_blocks",
       "max_running", "preemptions", "dropped_seen", "compactions", "chunkkv_seconds"}
"""
from __future__ import annotations

import json
import os
import sys


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    inprocess = spec.get("inprocess", True)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inprocess else "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; else vLLM reserves most of the RAM
    from vllm import LLM, SamplingParams

    llm = LLM(model=spec["model"], **spec["engine"])
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    result: dict = {}
    scheduler = runner = None
    if inprocess:
        scheduler = engine.engine_core.engine_core.scheduler
        runner = engine.model_executor.driver_worker.worker.model_runner
        pool = scheduler.kv_cache_manager.block_pool
        result["free_blocks_start"] = pool.get_num_free_blocks()
        result["total_blocks"] = pool.num_gpu_blocks
        result["block_size"] = scheduler.block_size
    ids = [engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp) for i, p in enumerate(spec["prompts"])]
    outputs: dict[str, list[int]] = {}
    abort = spec.get("abort")
    steps = 0
    max_running = 0
    dropped_seen: dict[str, int] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if scheduler is not None:
            max_running = max(max_running, len(scheduler.running))
            dropped_seen.update(getattr(scheduler, "chunkkv_dropped", {}))
        if abort and steps == abort["after_steps"]:
            engine.abort_request([f"r{abort['prompt']}"])  # the external id
    result["outputs"] = [outputs.get(ids[i], outputs.get(f"r{i}")) for i in range(len(spec["prompts"]))]
    if scheduler is not None:
        result["free_blocks_end"] = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        result["max_running"] = max_running
        result["preemptions"] = getattr(scheduler, "chunkkv_preemptions", None)
        result["dropped_seen"] = dropped_seen
        result["dropped_left"] = dict(getattr(scheduler, "chunkkv_dropped", {}))
        result["compactions"] = getattr(runner, "chunkkv_compactions", None)
        result["chunkkv_seconds"] = getattr(runner, "chunkkv_seconds", None)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
