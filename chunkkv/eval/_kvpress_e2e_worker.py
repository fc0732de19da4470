"""Runs in kvpress's venv: end-to-end prefill and decode of SmolLM2 with kvpress's ChunkKV and with the full cache.

Arguments: a JSON job file {"gguf", "prompts": [[ids]], "new_tokens", "ratio", "threads", "repeats"}. Prints one JSON
line: a list of rows like speed.py's e2e rows (cache "kvpress-full" or "kvpress").
"""
import json
import os
import statistics
import sys
import time

import torch
from kvpress import ChunkKVPress, SnapKVPress
from transformers import AutoModelForCausalLM, DynamicCache

job = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(job["threads"])
torch.set_grad_enabled(False)
folder, name = os.path.dirname(job["gguf"]), os.path.basename(job["gguf"])
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                             attn_implementation="sdpa").eval().float()  # kvpress asserts on eager


def run(x, name: str, decode: bool) -> dict:
    # kvpress's compression_ratio is the fraction dropped; chunk_length 10 as chunkkv's default
    press = ChunkKVPress(press=SnapKVPress(compression_ratio=1 - job["ratio"]), chunk_length=10)
    cache = DynamicCache()
    t0 = time.perf_counter()
    if name == "kvpress":
        with press(model):
            logits = model(x, past_key_values=cache, use_cache=True).logits[:, -1]
    else:
        logits = model(x, past_key_values=cache, use_cache=True).logits[:, -1]
    prefill = time.perf_counter() - t0
    kv_after = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    decode_s = float("nan")
    if decode:
        tok = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(job["new_tokens"]):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode_s = time.perf_counter() - t0
    return {"prompt_tokens": x.shape[1], "cache": name, "prefill_s": prefill,
            "decode_tok_s": job["new_tokens"] / decode_s, "kv_bytes_after_prefill": kv_after,
            "kv_bytes_peak_prefill": None, "keep_ratio": job["ratio"] if name == "kvpress" else 1.0}


rows = []
for ids in job["prompts"]:
    x = torch.tensor([ids])
    runs = {"kvpress-full": [], "kvpress": []}
    for rep in range(job["repeats"]):  # alternating, median prefill, decode on the last
        for name in runs:
            runs[name].append(run(x, name, decode=rep == job["repeats"] - 1))
    for name, rs in runs.items():
        rows.append(dict(rs[-1], prefill_s=statistics.median(r["prefill_s"] for r in rs),
                         prefill_runs_s=[r["prefill_s"] for r in rs]))
print(json.dumps(rows))
