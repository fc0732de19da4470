"""A new method prototyped in Python, defined and registered in this one file, runs through
`chunkkv.patch` and `generate`: its token scores come from Python, the chunk pick from the C core."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import chunkkv
import reference as ref
from chunkkv import compressors
from tiny_models import tiny_model, with_cache

torch.set_grad_enabled(False)


@dataclass(frozen=True)
class KeyNorm(compressors.Method):
    """A toy rule: a token scores the L2 norm of its keys (summed over KV heads for shared chunks)."""

    def token_scores(self, queries, keys, *, scale, row_starts):
        P = keys.shape[-2] - queries.shape[-2]
        s = keys[..., :P, :].float().norm(dim=-1)                   # [B, Hkv, P]
        if row_starts is not None:
            for b, start in enumerate(row_starts):
                s[b, :, :start] = 0.0
        return s


@pytest.fixture
def keynorm():
    method = compressors.register(KeyNorm("keynorm", "Toy: chunks of the largest key norms."))
    yield method
    compressors.unregister("keynorm")


@pytest.mark.parametrize("per_head", [False, True])
def test_a_python_scored_method_runs_through_patch_and_generate(keynorm, per_head):
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 120), generator=g)
    budget, window, chunk = 33, 8, 5
    assert "keynorm" in chunkkv.methods()
    with chunkkv.patch(model, budget=budget, window=window, chunk_size=chunk, method="keynorm", reuse=2,
                       per_head=per_head) as h:
        cache = DynamicCache(config=model.config)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=0, **with_cache(cache))
    assert out.shape == (2, 124)
    assert h.stats.selections == 2 and h.stats.gathers == 4
    full = DynamicCache(config=model.config)
    model(ids, **with_cache(full), use_cache=True)  # unpatched: every layer's keys
    for layer_idx in (0, 2):  # the reuse leaders
        keys = full.layers[layer_idx].keys.to(torch.float64).numpy()
        s = np.linalg.norm(keys[:, :, :120 - window], axis=-1)   # [B, Hkv, P]
        want = ref.select(np.empty((2, 1, window, 1)), keys, budget=budget, chunk_size=chunk, token_scores=s,
                          per_head=per_head, method="chunkkv")
        got = cache.layers[layer_idx].positions()[..., :budget].numpy()
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(cache.layers[layer_idx + 1].positions()[..., :budget].numpy(), want)


def test_registering_twice_or_a_non_method_is_refused(keynorm):
    with pytest.raises(ValueError, match="exists already"):
        compressors.register(KeyNorm("keynorm", "again"))
    with pytest.raises(TypeError, match="expected a Method"):
        compressors.register("keynorm")
