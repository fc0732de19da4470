"""Randomly initialised small causal LMs of each supported family (shape paths only)."""
from __future__ import annotations

import inspect

import torch
import transformers

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 16, "num_hidden_layers": 6}),
}


def tiny_model(family: str = "llama", attn: str = "eager", seed: int = 0, **overrides) -> torch.nn.Module:
    """A random `family` model in eval mode, float32, with the given attention implementation."""
    config_name, model_name, extra = FAMILIES[family]
    kwargs = {**COMMON, **extra, **overrides}
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    # random init has tiny weights: scale the projections up so attention is not uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(8.0)
    return model


#: the keyword models and generate() take the cache under ("cache" in newer transformers 5 releases)
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def with_cache(cache) -> dict:
    """{CACHE_KW: cache}, to pass a cache to forward() or generate() on either major version."""
    return {CACHE_KW: cache}
