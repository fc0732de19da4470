"""Runs in kvpress's venv: times ChunkKVPress(SnapKVPress(0.9)).compress on saved keys and values.

Builds a Llama-3-8B-shaped attention module (random weights) for the query projection kvpress does
inside compress; that projection is timed on its own and subtracted. Prints one JSON line.
"""
import json
import statistics
import sys
import time

import torch
from kvpress import ChunkKVPress, SnapKVPress
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

torch.set_grad_enabled(False)
data = torch.load(sys.argv[1])
k, v, reps = data["k"], data["v"], data["reps"]
B, Hkv, L, D = k.shape
config = LlamaConfig(hidden_size=32 * D, num_attention_heads=32, num_key_value_heads=Hkv, head_dim=D)
module = LlamaAttention(config, layer_idx=0).to(k.dtype)
hidden = torch.randn(B, L, config.hidden_size).to(k.dtype)
pos = torch.arange(L)[None]
cos, sin = LlamaRotaryEmbedding(config)(hidden, pos)
kwargs = {"position_embeddings": (cos, sin)}
press = ChunkKVPress(press=SnapKVPress(compression_ratio=0.9))


def timed(fn):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


total = timed(lambda: press.compress(module, hidden, k, v, None, kwargs))
proj = timed(lambda: module.q_proj(hidden[:, -press.press.window_size:]))
print(json.dumps({"compress_ms": total - proj, "with_projection_ms": total, "projection_ms": proj}))
