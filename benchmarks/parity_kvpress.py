#!/usr/bin/env python3
"""Parity with NVIDIA kvpress: ChunkKVPress(SnapKVPress(compression_ratio=r), chunk_length=20) versus
chunkkv's "chunkkv-kvpress" mode, on the same model and prompts.

kvpress pins transformers < 5.3, so it runs in its own virtual environment (created on first use with
--setup-venv) as a worker process of this same script. Both sides prefill each prompt, report the kept
positions of every layer (kvpress's by matching its kept key rows against the uncompressed keys) and
decode greedily; this side reports, per layer, the fraction of kvpress's kept positions that chunkkv
also keeps, and whether the greedy outputs agree.

    python benchmarks/parity_kvpress.py --setup-venv --json benchmarks/results/parity_kvpress.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = Path(os.environ.get("CHUNKKV_KVPRESS_VENV", Path.home() / ".cache" / "chunkkv" / "kvpress-venv"))
KVPRESS_PINS = ["torch==2.13.0", "kvpress==0.5.5", "transformers<5.3", "gguf", "accelerate"]


def build_prompts(tokenizer, shared: Path, n_prompts: int, n_tokens: int) -> list[list[int]]:
    """Token ids of prompts cut from the NIAH essays and the multi_news contexts (deterministic)."""
    texts = []
    essays = sorted((shared / "data" / "niah" / "PaulGrahamEssays").glob("*.txt"))
    for path in essays[: (n_prompts + 1) // 2]:
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    news = shared / "data" / "longbench" / "multi_news.jsonl"
    if news.exists():
        for line in news.read_text(encoding="utf-8").splitlines()[: n_prompts - len(texts)]:
            texts.append(json.loads(line)["context"])
    prompts = []
    for text in texts[:n_prompts]:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:n_tokens]
        prompts.append(ids + tokenizer("\nIn one sentence, what is this about?", add_special_tokens=False).input_ids)
    return prompts


def greedy_continue(model, cache, last_logits, n: int, first_position: int | None = None) -> list[int]:
    """Greedy tokens after a prefill; first_position overrides the RoPE position of the first new token."""
    import torch

    out, tok = [], last_logits.argmax(-1, keepdim=True)
    for t in range(n):
        out.append(int(tok))
        kw = {} if first_position is None else {"position_ids": torch.tensor([[first_position + t]])}
        logits = model(tok.view(1, 1), past_key_values=cache, use_cache=True, **kw).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
    return out


def load_gguf(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 attn_implementation="sdpa").eval()  # kvpress ChunkKVPress asserts on eager
    return model.float(), tok


def worker(args) -> None:
    """Runs in kvpress's environment: kept positions per layer and greedy tokens for every (prompt, ratio)."""
    import torch
    from kvpress import ChunkKVPress, SnapKVPress
    from transformers import DynamicCache

    torch.set_grad_enabled(False)
    model, _ = load_gguf(args.gguf)
    job = json.loads(Path(args.job).read_text())
    results = []
    for ids in job["prompts"]:
        x = torch.tensor([ids])
        full = DynamicCache()
        model(x, past_key_values=full, use_cache=True)
        lookup = []
        for layer in full.layers:
            k = layer.keys[0].transpose(0, 1).reshape(layer.keys.shape[2], -1)  # [L, H*D]
            lookup.append({k[j].numpy().tobytes(): j for j in range(k.shape[0])})
        for ratio in job["ratios"]:
            press = ChunkKVPress(press=SnapKVPress(compression_ratio=ratio), chunk_length=job["chunk"])
            cache = DynamicCache()
            t0 = time.perf_counter()
            with press(model):
                logits = model(x, past_key_values=cache, use_cache=True).logits[:, -1]
            elapsed = time.perf_counter() - t0
            kept = []
            for layer, table in zip(cache.layers, lookup):
                k = layer.keys[0].transpose(0, 1).reshape(layer.keys.shape[2], -1)
                kept.append(sorted(table.get(k[j].numpy().tobytes(), -1) for j in range(k.shape[0])))
            results.append({"ratio": ratio, "kept": kept, "greedy": greedy_continue(model, cache, logits, job["new"]),
                            "prefill_s": elapsed})
    Path(args.out).write_text(json.dumps(results))


def setup_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *KVPRESS_PINS[1:]], check=True)
    return python


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="kvpress's virtual environment")
    p.add_argument("--setup-venv", action="store_true", help="create the venv (torch 2.13, kvpress 0.5.5) if missing")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="the shared data folder")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    p.add_argument("--ratios", default="0.5,0.75,0.9", help="kvpress compression ratios")
    p.add_argument("--chunk", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "parity_kvpress.json")
    p.add_argument("--role", default="main", choices=["main", "kvpress-worker"], help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role == "kvpress-worker":
        return worker(args)

    import torch
    from transformers import DynamicCache

    import chunkkv
    from chunkkv.models import load_smollm2, smollm2_gguf_path

    torch.set_grad_enabled(False)
    python = setup_venv(args.venv) if args.setup_venv else args.venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"kvpress venv not found at {args.venv}; rerun with --setup-venv")
    gguf = smollm2_gguf_path()
    model, tok = load_smollm2(attn_implementation="sdpa")
    prompts = build_prompts(tok, args.shared, args.prompts, args.tokens)
    ratios = [float(r) for r in args.ratios.split(",")]
    job = Path(args.json).with_suffix(".job.json")
    out = Path(args.json).with_suffix(".kvpress.json")
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_text(json.dumps({"prompts": prompts, "ratios": ratios, "chunk": args.chunk, "new": args.new_tokens}))
    t0 = time.perf_counter()
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(python), __file__, "--role", "kvpress-worker", "--job", str(job), "--out", str(out),
                    "--gguf", gguf], check=True, env=env)
    print(f"kvpress worker: {time.perf_counter() - t0:.1f} s")
    theirs = json.loads(out.read_text())

    rows, it = [], iter(theirs)
    for pi, ids in enumerate(prompts):
        x = torch.tensor([ids])
        for ratio in ratios:
            ref = next(it)
            cache = DynamicCache(config=model.config)
            with chunkkv.patch(model, keep_ratio=1 - ratio, method="chunkkv-kvpress", window=64,
                               chunk_size=args.chunk):
                t1 = time.perf_counter()
                logits = model(x, cache=cache, use_cache=True).logits[:, -1]
                elapsed = time.perf_counter() - t1
            ours = [layer.positions()[0].tolist() for layer in cache.layers]
            agree = [len(set(a) & set(b)) / max(len(b), 1) for a, b in zip(ours, ref["kept"])]
            # kvpress decodes on with the kept count as the cache length, so new tokens get RoPE positions
            # from len(kept) on; chunkkv keeps the true positions. Decode both ways to show the cause.
            shifted = greedy_continue(model, copy.deepcopy(cache), logits, args.new_tokens, first_position=len(ours[0]))
            greedy = greedy_continue(model, cache, logits, args.new_tokens)
            rows.append({"prompt": pi, "L": len(ids), "ratio": ratio, "asked": round((1 - ratio) * len(ids)),
                         "kept_chunkkv": len(ours[0]), "kept_kvpress": len(ref["kept"][0]),
                         "agreement_per_layer": agree, "identical_layers": sum(a == b for a, b in zip(ours, ref["kept"])),
                         "layers": len(ours), "greedy_equal": greedy == ref["greedy"],
                         "greedy_equal_at_kvpress_positions": shifted == ref["greedy"],
                         "greedy_chunkkv": tok.decode(greedy), "greedy_kvpress": tok.decode(ref["greedy"]),
                         "prefill_s_chunkkv": elapsed, "prefill_s_kvpress": ref["prefill_s"]})
            print(f"prompt {pi} L={len(ids)} r={ratio}: agreement {min(agree):.4f}..{max(agree):.4f}, "
                  f"identical layers {rows[-1]['identical_layers']}/{len(ours)}, greedy equal {rows[-1]['greedy_equal']} "
                  f"(at kvpress's positions: {rows[-1]['greedy_equal_at_kvpress_positions']})")
    mean = sum(sum(r["agreement_per_layer"]) for r in rows) / sum(r["layers"] for r in rows)
    summary = {"mean_agreement": mean, "min_agreement": min(min(r["agreement_per_layer"]) for r in rows),
               "identical_layers": sum(r["identical_layers"] for r in rows),
               "layers": sum(r["layers"] for r in rows), "greedy_equal": sum(r["greedy_equal"] for r in rows),
               "greedy_equal_at_kvpress_positions": sum(r["greedy_equal_at_kvpress_positions"] for r in rows),
               "runs": len(rows), "kvpress": "0.5.5", "model": os.path.basename(gguf)}
    Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    job.unlink(missing_ok=True)
    out.unlink(missing_ok=True)  # the worker's raw output: its figures are in the rows above
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
