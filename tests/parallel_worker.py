"""One rank of tests/test_parallel.py: a patched model, run the cases, save what this rank kept.

    torchrun --nproc_per_node 2 tests/parallel_worker.py MODEL_DIR OUT_DIR

The model is loaded with transformers' tensor parallelism (each rank holds some of the KV heads) over
the gloo backend. Each rank writes OUT_DIR/rank{R}.pt: for every case of parallel_cases.CASES the
kept positions and keys of each full-attention layer, or the tokens generate() decoded, or the error
the patch raised; and prints a line per case of what it kept.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chunkkv  # noqa: E402
from parallel_cases import run_cases, summary  # noqa: E402


def main() -> None:
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    chunkkv.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import transformers

    if hasattr(transformers, "DistributedConfig"):  # transformers 5: tp_plan= is deprecated
        extra = {"distributed_config": transformers.DistributedConfig(tp_size=world)}
    else:
        extra = {"tp_plan": "auto"}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **extra)
    model.eval()
    results = run_cases(model)
    results["rank"], results["world"], results["tp_size"] = rank, world, getattr(model, "tp_size", None)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    for case in ("chunkkv_reuse1", "chunkkv_reuse2", "snapkv_per_head", "chunkkv_kvpress", "generate_reuse2_padded"):
        print(f"rank {rank}: {summary(results, case)}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
