"""chunkkv.patch inside transformers: exactness against a masked full cache, reuse, padding, families."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

import chunkkv
from chunkkv.cache import CompressedLayer, layer_positions
from tiny_models import FAMILIES, tiny_model, with_cache

torch.set_grad_enabled(False)


def _prompt(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _greedy(model, ids, n=6, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0, **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_logits_equal_full_cache_with_dropped_positions_masked(family, attn):
    """The oracle: decoding on the compressed cache == the full model with the dropped positions masked."""
    model = tiny_model(family, attn)
    n_layers = model.config.num_hidden_layers
    B, L, T, budget = 2, 97, 5, 41
    ids = _prompt(B, L + T, seed=1)
    prompt, follow = ids[:, :L], ids[:, L:]
    with chunkkv.patch(model, budget=budget, window=8, chunk_size=5, reuse=n_layers):
        cache = DynamicCache(config=model.config)
        model(prompt, **with_cache(cache), use_cache=True)
        kept = cache.layers[0].positions()  # [B, budget], shared by every layer (reuse = layers)
        logits = []
        for t in range(T):
            out = model(follow[:, t:t + 1], **with_cache(cache), use_cache=True)
            logits.append(out.logits[:, -1])
    compressed = torch.stack(logits, 1)

    total = L + T
    allowed = torch.ones(B, total, total, dtype=torch.bool).tril()
    dropped = torch.ones(B, L, dtype=torch.bool)
    dropped.scatter_(1, kept, False)
    allowed[:, L:, :L] &= ~dropped[:, None, :]
    mask = torch.zeros(B, 1, total, total).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    # full logits at positions L..L+T-1 are those of inputs follow[0..T-1]
    full = model(ids, attention_mask=mask).logits[:, L:L + T]
    torch.testing.assert_close(compressed, full, rtol=1e-4, atol=1e-4)
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_budget_covering_prompt_is_identical_and_unpatch_restores(attn):
    model = tiny_model("llama", attn)
    ids = _prompt(2, 60)
    base = _greedy(model, ids, 8)
    with chunkkv.patch(model, budget=60):
        assert torch.equal(_greedy(model, ids, 8), base)
    assert torch.equal(_greedy(model, ids, 8), base)
    handle = chunkkv.patch(model, budget=16, window=8)
    _greedy(model, ids, 8)
    chunkkv.unpatch(model)
    assert not hasattr(model, "_chunkkv_patch")
    assert torch.equal(_greedy(model, ids, 8), base)
    handle.remove()  # a second removal is harmless


@pytest.mark.parametrize("reuse", [1, 2, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_layers_hold_budget_followers_share_leader_positions(reuse, per_head):
    model = tiny_model("llama")
    budget, window, chunk, L = 37, 8, 6, 150
    ids = _prompt(2, L, seed=3)
    with chunkkv.patch(model, budget=budget, window=window, chunk_size=chunk, reuse=reuse, per_head=per_head) as h:
        cache = DynamicCache(config=model.config)
        model(ids, **with_cache(cache), use_cache=True)
    n_layers = model.config.num_hidden_layers
    assert h.stats.selections == -(-n_layers // reuse)
    assert h.stats.gathers == n_layers
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, CompressedLayer)
        assert layer.keys.shape[-2] == budget and layer.values.shape[-2] == budget
        assert layer.get_seq_length() == L
        pos = layer.positions()
        leader = cache.layers[i - i % reuse].positions()
        assert torch.equal(pos, leader)
        flat = pos.reshape(-1, budget)
        for row in flat.tolist():
            assert row == sorted(set(row))
            assert row[-window:] == list(range(L - window, L))
            prefix = row[:-window]
            chunks = {}
            for p in prefix:
                chunks.setdefault(p // chunk, []).append(p)
            partial = [c for c, members in chunks.items() if len(members) != min(chunk, L - window - c * chunk)]
            assert len(partial) <= 1


def test_follower_layers_do_not_score(monkeypatch):
    calls = {"select": 0}
    real = chunkkv.ops.select

    def counting_select(*a, **k):
        calls["select"] += 1
        return real(*a, **k)

    monkeypatch.setattr(chunkkv.ops, "select", counting_select)
    model = tiny_model("llama", num_hidden_layers=6)
    with chunkkv.patch(model, budget=30, window=8, reuse=3):
        model(_prompt(1, 80), **with_cache(DynamicCache(config=model.config)), use_cache=True)
    assert calls["select"] == 2


def test_keep_ratio_and_decoding_appends_after_kept_tokens():
    model = tiny_model("llama")
    ids = _prompt(1, 200)
    with chunkkv.patch(model, keep_ratio=0.25, window=16):
        cache = DynamicCache(config=model.config)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    layer = cache.layers[0]
    assert cache.get_seq_length() == 204  # 200 prompt + 4 decoded tokens stored (the 5th is not fed back)
    assert layer.keys.shape[-2] == 50 + 4
    assert layer.positions()[0, -4:].tolist() == [200, 201, 202, 203]
    assert out.shape[1] == 205


def test_multi_turn_second_generate_continues_on_the_cache():
    model = tiny_model("llama")
    turn1 = _prompt(1, 120, seed=5)
    with chunkkv.patch(model, budget=40, window=8) as h:
        cache = DynamicCache(config=model.config)
        out1 = model.generate(turn1, attention_mask=torch.ones_like(turn1), **with_cache(cache), max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
        turn2 = torch.cat([out1, _prompt(1, 50, seed=6)], dim=1)
        out2 = model.generate(turn2, attention_mask=torch.ones_like(turn2), **with_cache(cache), max_new_tokens=4,
                              do_sample=False, pad_token_id=0)
    assert torch.equal(out2[:, :turn2.shape[1]], turn2)
    assert cache.get_seq_length() == turn2.shape[1] + 3
    assert cache.layers[0].keys.shape[-2] == 40 + 3  # recompressed at the second prefill
    assert h.stats.prefills == 2
    pos = cache.layers[0].positions()[0].tolist()
    assert pos == sorted(pos) and pos[-3:] == [turn2.shape[1], turn2.shape[1] + 1, turn2.shape[1] + 2]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch_rows_match_their_own_unpadded_runs(attn):
    model = tiny_model("llama", attn)
    long, short, tiny = _prompt(1, 90, seed=7), _prompt(1, 64, seed=8), _prompt(1, 20, seed=9)
    budget = 32
    rows = [long, short, tiny]
    Lmax = 90
    batch = torch.zeros(3, Lmax, dtype=torch.long)
    mask = torch.zeros(3, Lmax, dtype=torch.long)
    for r, ids in enumerate(rows):
        batch[r, Lmax - ids.shape[1]:] = ids[0]
        mask[r, Lmax - ids.shape[1]:] = 1
    with chunkkv.patch(model, budget=budget, window=8, chunk_size=4):
        cache = DynamicCache(config=model.config)
        out = model.generate(batch, attention_mask=mask, **with_cache(cache), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)[:, Lmax:]
        pos = cache.layers[0].positions()
        singles = []
        for ids in rows:
            c = DynamicCache(config=model.config)
            singles.append(_greedy(model, ids, 6, **with_cache(c)))
            single_pos = layer_positions(c.layers[0])[0, :min(budget, ids.shape[1])]
            r = len(singles) - 1
            pad = Lmax - ids.shape[1]
            if ids.shape[1] > budget:  # no padding kept: the same tokens as the row alone, shifted
                assert torch.equal(pos[r, :budget], single_pos + pad)
    for r in range(3):
        assert torch.equal(out[r], singles[r][0]), f"row {r}"


# Gemma 2 has no sdpa path in transformers (its logit soft-capping needs eager)
FAMILY_ATTN = [(f, a) for f in sorted(FAMILIES) for a in ("eager", "sdpa") if (f, a) != ("gemma2", "sdpa")]


@pytest.mark.parametrize("family, attn", FAMILY_ATTN)
def test_every_family_generates_with_compressed_full_layers(family, attn):
    model = tiny_model(family, attn)
    ids = _prompt(2, 80, seed=11)
    with chunkkv.patch(model, budget=24, window=8, reuse=2) as h:
        cache = DynamicCache(config=model.config)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, 84)
    full = [i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_sliding", False)]
    assert full and h.stats.gathers == len(full)
    assert h.stats.selections == -(-len(full) // 2), "one selection per reuse group of full-attention layers"
    for i, layer in enumerate(cache.layers):
        if i in full:
            assert isinstance(layer, CompressedLayer) and layer.keys.shape[-2] == 24 + 3
        else:
            assert not isinstance(layer, CompressedLayer)


def test_static_cache_is_refused_with_a_reason():
    model = tiny_model("llama")
    ids = _prompt(1, 40)
    with chunkkv.patch(model, budget=16, window=8):
        with pytest.raises(TypeError, match="DynamicCache"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                           **with_cache(StaticCache(config=model.config, max_cache_len=64)), pad_token_id=0)


@pytest.mark.parametrize("kwargs, error", [
    (dict(), ValueError), (dict(budget=10, keep_ratio=0.5), ValueError), (dict(budget=4, window=8), ValueError),
    (dict(keep_ratio=1.5), ValueError), (dict(keep_ratio=0.0), ValueError),
    (dict(budget=16, window=8, reuse=0), ValueError), (dict(budget=16, window=8, chunk_size=0), ValueError),
    (dict(budget=16, window=8, method="nope"), ValueError), (dict(budget=16, window=0), ValueError),
    (dict(budget=16.0, window=8), TypeError), (dict(budget=16, window=8, per_head=1), TypeError),
    (dict(keep_ratio="half"), TypeError), (dict(budget=16, window=8, reuse=1.5), TypeError),
])
def test_bad_arguments(kwargs, error):
    model = tiny_model("llama")
    with pytest.raises(error):
        chunkkv.patch(model, **kwargs)
    assert not hasattr(model, "_chunkkv_patch")


def test_double_patch_and_non_module():
    model = tiny_model("llama")
    with chunkkv.patch(model, budget=16, window=8):
        with pytest.raises(ValueError, match="already patched"):
            chunkkv.patch(model, budget=16, window=8)
    with pytest.raises(TypeError):
        chunkkv.patch("not a model", budget=16, window=8)


def test_error_inside_compression_leaves_model_usable(monkeypatch):
    model = tiny_model("llama")
    ids = _prompt(1, 70)
    base = _greedy(model, ids)

    def broken(*a, **k):
        raise RuntimeError("boom")

    handle = chunkkv.patch(model, budget=20, window=8)
    monkeypatch.setattr(chunkkv.ops, "select", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _greedy(model, ids)
    monkeypatch.undo()
    assert _greedy(model, ids).shape == base.shape  # still patched, works again
    handle.remove()
    assert torch.equal(_greedy(model, ids), base)


def test_right_padding_is_refused_with_a_reason():
    model = tiny_model("llama")
    ids = _prompt(2, 60)
    mask = torch.ones_like(ids)
    mask[1, -10:] = 0  # right padding: zeros after the row's tokens
    with chunkkv.patch(model, budget=20, window=8):
        with pytest.raises(ValueError, match="left-padded"):
            model(ids, attention_mask=mask, **with_cache(DynamicCache(config=model.config)), use_cache=True)
