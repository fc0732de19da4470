"""chunkkv.patch on the real pretrained stories260K Llama (GQA 8/4, RoPE) and SmolLM2 (GQA 9/3)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

import chunkkv
from chunkkv.cache import CompressedLayer
from chunkkv.compressors import METHODS
from chunkkv.models import load_smollm2, load_stories260k
from shared_data import require_smollm2, stories_folder
from tiny_models import with_cache

torch.set_grad_enabled(False)
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big, red ball. She wanted to play with it, but it was too high. ")


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def stories(request):
    return load_stories260k(stories_folder(), attn_implementation=request.param)


def _generate(model, tok, text, n=20, **kw):
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, **kw)
    return out[0, ids.input_ids.shape[1]:]


def test_budget_covering_prompt_is_identical(stories):
    model, tok = stories
    text = STORY * 2
    base = _generate(model, tok, text)
    with chunkkv.patch(model, budget=512):
        assert torch.equal(_generate(model, tok, text), base)
    assert torch.equal(_generate(model, tok, text), base)


METHOD_REUSE = [(m, r) for m in sorted(METHODS) for r in (1, 2) if not (METHODS[m].pyramid and r > 1)]


@pytest.mark.parametrize("method, reuse", METHOD_REUSE)
def test_compressed_generation_on_the_real_model(stories, method, reuse):
    model, tok = stories
    text = STORY * 3
    n_prompt = tok(text, return_tensors="pt").input_ids.shape[1]
    budget = n_prompt // 3
    cache = DynamicCache(config=model.config)
    with chunkkv.patch(model, budget=budget, window=16, reuse=reuse, method=method) as h:
        out = _generate(model, tok, text, n=12, **with_cache(cache))
    assert out.shape[0] == 12
    assert h.stats.selections == -(-model.config.num_hidden_layers // reuse)
    stored = [layer.keys.shape[-2] - 11 for layer in cache.layers]
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    if METHODS[method].pyramid:
        assert sum(stored) == pytest.approx(budget * len(stored), abs=len(stored))
    elif METHODS[method].budget_exact:
        assert stored == [budget] * len(stored)
    else:  # kvpress's whole chunks: at most the budget
        assert all(s <= budget for s in stored)
    assert tok.decode(out, skip_special_tokens=True).strip()  # says something


def test_chunkkv_keeps_repeated_story_answerable(stories):
    """With 40% of a thrice-repeated story, ChunkKV still continues like the full cache for a few tokens."""
    model, tok = stories
    text = STORY * 3
    base = _generate(model, tok, text, n=8)
    n_prompt = tok(text, return_tensors="pt").input_ids.shape[1]
    with chunkkv.patch(model, budget=int(0.4 * n_prompt), window=16):
        out = _generate(model, tok, text, n=8)
    assert torch.equal(out[:3], base[:3])


def test_pipeline_runs_chunkkv(stories):
    model, tok = stories
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    base = gen(STORY * 2, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    with chunkkv.patch(model, budget=48, window=16) as h:
        text = gen(STORY * 2, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert h.stats.prefills == 1 and h.stats.gathers == model.config.num_hidden_layers
    assert text.startswith(STORY * 2) and len(text) > len(STORY * 2)
    assert gen(STORY * 2, max_new_tokens=10, do_sample=False)[0]["generated_text"] == base


def test_smollm2_finds_the_pass_key_with_a_compressed_cache():
    """The demo's task on the real 135M model: the full cache finds the key, and so does ChunkKV at 20%."""
    require_smollm2()
    from chunkkv.__main__ import haystack_prompt

    model, tok = load_smollm2()
    ids = tok(haystack_prompt(tok, 800, 0.4, 71234), return_tensors="pt")
    answers = {}
    for name, kw in [("full", None), ("chunkkv", dict(keep_ratio=0.2, window=32, reuse=2))]:
        handle = chunkkv.patch(model, **kw) if kw else None
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
        answers[name] = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
        if handle:
            assert handle.stats.selections == -(-model.config.num_hidden_layers // 2)
            handle.remove()
    assert "71234" in answers["full"], answers
    assert "71234" in answers["chunkkv"], answers
