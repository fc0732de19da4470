#!/usr/bin/env python3
"""vLLM capacity with and without chunkkv at a fixed KV space (CPU backend).

N requests of ~L prompt tokens each (distinct, so no prefix is shared; prefix caching off in both runs) go
to one engine whose KV cache holds a fixed number of blocks (``num_gpu_blocks_override``). Each engine runs
in its own process; every engine step is timed. Written: the most requests running at once, total time,
output tokens/s, KV blocks in use (peak and mean over steps), and for chunkkv the time spent selecting and
moving tokens against the time of the steps that compressed (its share of prefill).

    python benchmarks/vllm_capacity.py --out benchmarks/results/vllm.json      # runs both, then --report
    python benchmarks/vllm_capacity.py --report                                  # JSON -> BENCHMARKS.md section
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "vllm_capacity"


def make_prompts(tokenizer, n: int, length: int, seed: int) -> list[list[int]]:
    """n distinct prompts of exactly `length` tokens: shuffled sentences, a number to recall at the end."""
    rng = random.Random(seed)
    sentences = [f"The keeper of lighthouse {i} logged {rng.randint(10, 99)} ships and {rng.randint(2, 9)} storms."
                 for i in range(400)]
    prompts = []
    for r in range(n):
        rng.shuffle(sentences)
        head = tokenizer(f"Document {r}. The code word is {rng.randint(1000, 9999)}. ").input_ids
        tail = tokenizer(" Question: what is the code word? Answer:").input_ids
        body: list[int] = []
        for s in sentences:
            body += tokenizer(" " + s).input_ids
            if len(head) + len(body) + len(tail) >= length:
                break
        prompts.append((head + body)[: length - len(tail)] + tail)
    return prompts


def run_mode(args: argparse.Namespace) -> dict:
    """One engine (full or chunkkv), in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB cap for the memory check; blocks are fixed below
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from chunkkv.vllm.models import smollm2_folder

    model = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    prompts = make_prompts(tokenizer, args.requests, args.prompt_tokens, args.seed)
    engine_kwargs = dict(dtype="float32", enforce_eager=True, seed=0, enable_prefix_caching=False,
                         max_model_len=args.prompt_tokens + args.max_tokens + 64,
                         num_gpu_blocks_override=args.kv_blocks, block_size=args.block_size)
    if args.mode == "chunkkv":
        engine_kwargs["additional_config"] = {"chunkkv": {"keep_ratio": args.keep_ratio, "window": 32,
                                                          "chunk_size": 10, "reuse": args.reuse}}
    llm = LLM(model=model, **engine_kwargs)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    runner = engine.model_executor.driver_worker.worker.model_runner
    pool = scheduler.kv_cache_manager.block_pool
    usable = pool.num_gpu_blocks - 1  # block 0 is the null block
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", {"prompt_token_ids": p}, sp)
    steps, running, used, compress_step_s = 0, [], [], 0.0
    out_tokens = 0
    began = time.perf_counter()
    while engine.has_unfinished_requests():
        before = getattr(runner, "chunkkv_compactions", 0)
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if getattr(runner, "chunkkv_compactions", 0) > before:
            compress_step_s += dt
        steps += 1
        running.append(len(scheduler.running))
        used.append(usable - pool.get_num_free_blocks())
        out_tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    total = time.perf_counter() - began
    result = {"max_running_requests": max(running), "total_s": round(total, 2),
              "output_tokens": out_tokens, "output_tok_per_s": round(out_tokens / total, 3),
              "kv_blocks_total": usable, "kv_blocks_peak": max(used), "kv_blocks_mean": round(sum(used) / len(used), 1),
              "steps": steps, "preemptions": getattr(scheduler, "chunkkv_preemptions", None)}
    if args.mode == "chunkkv":
        result["chunkkv_s"] = round(runner.chunkkv_seconds, 3)
        result["compressing_steps_s"] = round(compress_step_s, 2)
        result["chunkkv_share_of_prefill"] = round(runner.chunkkv_seconds / max(compress_step_s, 1e-9), 4)
    return result


def write_report(results: dict, output: Path) -> None:
    """Rewrite (or append) the vLLM capacity section of BENCHMARKS.md from the JSON."""
    cfg, full, ratio = results["config"], results["full"], results["ratios"]
    runs = [("full cache", full), (f"chunkkv, reuse {cfg.get('reuse', 1)}", results["chunkkv"])]
    if "chunkkv_reuse2" in results:
        runs.append(("chunkkv, reuse 2", results["chunkkv_reuse2"]))
    lines = [f"<!-- BEGIN {SECTION} -->", "## vLLM capacity (vllm-cpu, fixed KV space)", "",
             f"Generated by `python benchmarks/vllm_capacity.py --report` from `benchmarks/results/vllm.json`. "
             f"{cfg['requests']} requests of {cfg['prompt_tokens']} prompt tokens, {cfg['max_tokens']} greedy output "
             f"tokens each, SmolLM2-135M-Instruct fp32, {cfg['kv_blocks']} KV blocks of {cfg['block_size']} tokens "
             f"({cfg['kv_blocks'] * cfg['block_size']} token slots), prefix caching off, eager mode, "
             f"{cfg['threads']} OMP thread(s), {cfg['machine']} shared with other jobs (timings are indicative). "
             f"chunkkv: keep_ratio {cfg['keep_ratio']} ({max(math.ceil(cfg['keep_ratio'] * cfg['prompt_tokens']), 32)} tokens "
             "kept per layer), window 32, chunk 10.", "",
             "| run | max running at once | total s | output tok/s | KV blocks peak | KV blocks mean | preemptions | "
             "chunkkv s (share of compressing steps) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in runs:
        share = (f"{r['chunkkv_s']} ({100 * r['chunkkv_share_of_prefill']:.1f}%)" if "chunkkv_s" in r else "-")
        lines.append(f"| {name} | {r['max_running_requests']} | {r['total_s']} | {r['output_tok_per_s']} | "
                     f"{r['kv_blocks_peak']} | {r['kv_blocks_mean']} | "
                     f"{r['preemptions'] if r['preemptions'] is not None else '-'} | {share} |")
    lines += ["", f"chunkkv (reuse {cfg.get('reuse', 1)}) / full: {ratio['concurrent_requests']}x requests running at "
                  f"once, {ratio['output_tok_per_s']}x output tokens/s. The chunkkv time is what scoring, selecting "
                  "and moving kept tokens took inside the steps that compressed a prompt. Those steps (the prefills) took "
                  f"{results['chunkkv']['compressing_steps_s']} of the chunkkv run's {results['chunkkv']['total_s']} s: "
                  f"with {cfg['max_tokens']} output tokens per request prefill dominates, so output tokens/s grows "
                  "less than the number of requests running at once."]
    longer = ROOT / "benchmarks" / "results" / "vllm_long_output.json"
    if longer.exists():  # the same workload with longer outputs (--max-tokens 256 --out that file)
        other = json.loads(longer.read_text())
        lf, lc = other["full"], other["chunkkv"]
        lines += ["", f"Same workload with {other['config']['max_tokens']} output tokens per request "
                      f"(`benchmarks/results/{longer.name}`): full {lf['max_running_requests']} at once, "
                      f"{lf['output_tok_per_s']} tok/s; chunkkv {lc['max_running_requests']} at once, "
                      f"{lc['output_tok_per_s']} tok/s ({other['ratios']['output_tok_per_s']}x), chunkkv's share of "
                      f"the compressing steps {100 * lc['chunkkv_share_of_prefill']:.1f}%."]
    lines.append(f"<!-- END {SECTION} -->")
    section = "\n".join(lines)
    text = output.read_text(encoding="utf-8") if output.exists() else ""
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    output.write_text(text, encoding="utf-8")


def _child_args(config: dict, args: argparse.Namespace) -> list[str]:
    """The workload of `config` (so an added run matches the stored ones), chunkkv's reuse from args."""
    return ["--requests", str(config["requests"]), "--prompt-tokens", str(config["prompt_tokens"]),
            "--max-tokens", str(config["max_tokens"]), "--kv-blocks", str(config["kv_blocks"]),
            "--block-size", str(config["block_size"]), "--keep-ratio", str(config["keep_ratio"]),
            "--seed", str(args.seed), "--reuse", str(args.reuse)]


def _run_child(cmd: list[str], name: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(name, result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=4000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-blocks", type=int, default=72, help="KV blocks (fixed KV space), null block included")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--keep-ratio", type=float, default=0.1)
    ap.add_argument("--reuse", type=int, default=1, help="chunkkv's layer-wise index reuse")
    ap.add_argument("--add", metavar="NAME", help="run chunkkv only and add it to --out as NAME (e.g. chunkkv_reuse2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("full", "chunkkv"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm.json")
    ap.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section from --out")
    ap.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args)))
        return
    if args.add:
        results = json.loads(args.out.read_text())
        cmd = [sys.executable, __file__, "--mode", "chunkkv"] + _child_args(results["config"], args)
        results[args.add] = _run_child(cmd, args.add)
        results[args.add]["reuse"] = args.reuse
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    elif not args.report:
        results: dict = {"script": SECTION, "config": {
            "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
            "kv_blocks": args.kv_blocks, "block_size": args.block_size, "keep_ratio": args.keep_ratio,
            "threads": os.environ.get("OMP_NUM_THREADS", "all"), "machine": f"{os.cpu_count()} CPU cores"}}
        for mode in ("full", "chunkkv"):
            cmd = [sys.executable, __file__, "--mode", mode] + _child_args(results["config"], args)
            results[mode] = _run_child(cmd, mode)
        results["config"]["reuse"] = args.reuse
        results["ratios"] = {
            "concurrent_requests": round(results["chunkkv"]["max_running_requests"]
                                         / results["full"]["max_running_requests"], 2),
            "output_tok_per_s": round(results["chunkkv"]["output_tok_per_s"] / results["full"]["output_tok_per_s"], 2)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    write_report(json.loads(args.out.read_text()), args.benchmarks_md)


if __name__ == "__main__":
    main()
