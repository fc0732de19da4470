"""The cases tests/test_parallel.py runs on a tensor-parallel model (tests/parallel_worker.py, one
process per rank) and on the same model in one process: what each patched prefill kept, and what
generate() decoded. Small on purpose: CI runs two ranks on shared CPU cores."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

import chunkkv
from chunkkv import compressors
from chunkkv.cache import layer_positions

PROMPT = 150   # tokens of the single prompt; the padded batch's second row has PADDED_SHORT
PADDED_SHORT = 118
COMMON = dict(window=16, chunk_size=10)

#: name -> (patch arguments, batch, what to run)
CASES: dict[str, tuple[dict, str, str]] = {
    "chunkkv_reuse1": (dict(budget=64, reuse=1), "single", "prefill"),
    "chunkkv_reuse2": (dict(budget=64, reuse=2), "single", "prefill"),
    "snapkv_per_head": (dict(budget=64, method="snapkv"), "single", "prefill"),
    "snapkv_shared": (dict(budget=64, method="snapkv", per_head=False), "single", "prefill"),
    "h2o_shared": (dict(budget=64, method="h2o", per_head=False), "single", "prefill"),
    "chunkkv_padded": (dict(budget=64, reuse=2), "padded", "prefill"),
    "chunkkv_padded_ratio": (dict(keep_ratio=0.4, reuse=1), "padded", "prefill"),  # rows keep different budgets
    "prototype_shared": (dict(budget=64, method="tp-prototype"), "padded", "prefill"),  # scores from Python
    "chunkkv_kvpress": (dict(budget=64, method="chunkkv-kvpress", window=16), "single", "prefill"),
    "generate_reuse2_padded": (dict(budget=64, reuse=2), "padded", "generate"),
}


def batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention mask: one prompt, or two left-padded rows."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    if kind == "single":
        return ids[:1], mask[:1]
    ids[1, : PROMPT - PADDED_SHORT] = 0
    mask[1, : PROMPT - PADDED_SHORT] = 0
    return ids, mask


def run_case(model: torch.nn.Module, args: dict, kind: str, what: str) -> dict[str, Any]:
    ids, mask = batch(kind)
    with torch.no_grad():
        try:
            with chunkkv.patch(model, **{**COMMON, **args}):
                if what == "generate":
                    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8,
                                         do_sample=False, pad_token_id=0)
                    return {"tokens": out[:, ids.shape[1]:].clone()}
                cache = DynamicCache(config=model.config)
                model(ids, attention_mask=mask, **{chunkkv.cache_kwarg(model): cache}, use_cache=True)
        except ValueError as e:
            return {"error": str(e)}
    layers = [cache.layers[i] for i in range(len(cache.layers))]
    return {"positions": [layer_positions(la).clone() for la in layers],
            "keys": [la.keys.clone() for la in layers]}


@dataclass(frozen=True)
class PrototypeChunkKV(compressors.Method):
    """ChunkKV's window-attention scores given from Python (the registry's prototype path)."""

    def token_scores(self, queries, keys, *, scale, row_starts):
        return chunkkv.score(queries, keys, scale=scale, row_starts=row_starts)


def run_cases(model: torch.nn.Module) -> dict[str, Any]:
    compressors.register(PrototypeChunkKV("tp-prototype", "ChunkKV scored in Python (tests/parallel_cases.py)"))
    try:
        return {name: run_case(model, *case) for name, case in CASES.items()}
    finally:
        compressors.unregister("tp-prototype")


def ranges(positions: list[int]) -> str:
    """Sorted positions as compact ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for p in positions:
        if out and p == last + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        else:
            out.append(str(p))
        last = p
    return ", ".join(out)


def summary(results: dict[str, Any], case: str = "chunkkv_reuse1", layer: int = 0) -> str:
    """One line: what `case` kept at `layer` (row 0), or its error, or the decoded tokens."""
    got = results[case]
    if "error" in got:
        return f"{case}: {got['error']}"
    if "tokens" in got:
        return f"{case}: decoded {got['tokens'].tolist()}"
    pos = got["positions"][layer][0]
    kept = "; ".join(f"head {h}: {ranges(p.tolist())}" for h, p in enumerate(pos)) if pos.ndim == 2 \
        else ranges(pos.tolist())
    return f"{case}, layer {layer}, row 0 kept {kept}"
