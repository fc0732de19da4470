"""Runs in kvpress's venv: end-to-end prefill and decode of SmolLM2 with kvpress's ChunkKV and with the full cache.

Arguments: a JSON job file {"gguf", "prompts": [[ids]], "new_tokens", "ratio", "threads"}. Prints one JSON
line: a list of rows like speed.py's e2e rows (cache "kvpress-full" or "kvpress").
"""
import json
import os
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
rows = []
for ids in job["prompts"]:
    x = torch.tensor([ids])
    for name in ("kvpress-full", "kvpress"):
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
        tok = logits.argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(job["new_tokens"]):
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
        rows.append({"prompt_tokens": len(ids), "cache": name, "prefill_s": prefill,
                     "decode_tok_s": job["new_tokens"] / decode, "kv_bytes_after_prefill": kv_after,
                     "kv_bytes_peak_prefill": None, "keep_ratio": job["ratio"] if name == "kvpress" else 1.0})
print(json.dumps(rows))
