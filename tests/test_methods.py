"""The paper's baselines in the C core (H2O, StreamingLLM, PyramidKV's schedule, kvpress's ChunkKV),
each against a plain reference written here, and every method end to end through chunkkv.patch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import chunkkv
from chunkkv.cache import CompressedLayer, layer_positions
from chunkkv.compressors import METHODS, pyramid_budgets
from tiny_models import tiny_model, with_cache

torch.set_grad_enabled(False)
RNG = np.random.default_rng(1234)


def _qk(B, Hq, Hkv, w, L, D, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, w, D)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, D)).astype(np.float32)
    return q, k


def _causal_probs(q, k, scale):
    """Dense float64 softmax of queries at the last w positions over their visible keys: [B, Hq, w, L]."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    B, Hq, w, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    kk = np.repeat(k, Hq // Hkv, axis=1)
    logits = scale * q @ kk.swapaxes(-1, -2)
    visible = np.arange(L)[None, :] <= (L - w + np.arange(w))[:, None]
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def _top(values, k):
    """Positions of the k largest values, ties to the lower position."""
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return sorted(order[:k])


def _assert_same_or_near_tie(got, want, scores, what):
    got, want = list(got), list(want)
    if got == want:
        return
    diff = sorted(set(got) ^ set(want))
    vals = np.array([scores[j] for j in diff])
    assert np.ptp(vals) <= 1e-5 * max(abs(vals).max(), 1e-12), f"{what}: {got} != {want}"


CASES = [(1, 4, 2, 150, 8, 10), (2, 8, 2, 200, 16, 1), (1, 3, 3, 97, 4, 31), (3, 6, 1, 64, 8, 64),
         (1, 2, 1, 130, 16, 5)]


@pytest.mark.parametrize("B, Hq, Hkv, L, D, window", CASES)
def test_h2o_tiled_column_sums_equal_dense(B, Hq, Hkv, L, D, window):
    q, k = _qk(B, Hq, Hkv, L, L, D, seed=L + window)
    got = chunkkv.score(q, k, prefix=L - window)  # all L queries, in blocks of 64
    p = _causal_probs(q, k, 1 / math.sqrt(D))
    dense = p.sum(2).reshape(B, Hkv, Hq // Hkv, L).sum(2)[..., : L - window]
    np.testing.assert_allclose(got, dense, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("B, Hq, Hkv, L, D, window", CASES)
@pytest.mark.parametrize("per_head", [False, True])
def test_h2o_selects_heavy_hitters_and_recent_tokens(B, Hq, Hkv, L, D, window, per_head):
    q, k = _qk(B, Hq, Hkv, L, L, D, seed=7 * L + window)
    budget = window + (L - window) // 3
    idx = chunkkv.select(q, k, budget=budget, method="h2o", window=window, per_head=per_head)
    col = _causal_probs(q, k, 1 / math.sqrt(D)).sum(2).reshape(B, Hkv, Hq // Hkv, L).sum(2)[..., : L - window]
    rows = col if per_head else col.sum(1, keepdims=True)
    for b in range(B):
        for g in range(rows.shape[1]):
            want = _top(rows[b, g], budget - window) + list(range(L - window, L))
            got = idx[b, g] if per_head else idx[b]
            _assert_same_or_near_tie(got.tolist(), want, rows[b, g], f"h2o row {b} head {g}")


@pytest.mark.parametrize("L, w, budget, sinks", [(100, 8, 30, 4), (50, 10, 12, 4), (64, 4, 64, 4), (40, 5, 20, 0),
                                                 (33, 1, 3, 10)])
def test_streamingllm_keeps_exactly_sinks_and_recent(L, w, budget, sinks):
    q, k = _qk(2, 4, 2, w, L, 8, seed=L)
    idx = chunkkv.select(q, k, budget=budget, method="streamingllm", n_sink=sinks)
    n = min(budget, L)
    s = min(sinks, max(budget - w, 0)) if budget < L else 0
    want = list(range(L)) if budget >= L else list(range(s)) + list(range(L - (budget - s), L))
    assert idx.shape == (2, n)
    for row in idx.tolist():
        assert row == want


def _kvpress_reference(q, k, keep_fraction, chunk, kernel=5):
    """kvpress 0.5's ChunkKVPress(SnapKVPress()) selection, from its documented steps, in float64."""
    B, Hq, w, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P = Hq // Hkv, L - w
    p = _causal_probs(q, k, 1 / math.sqrt(D))[..., :P]            # [B, Hq, w, P]
    s = p.mean(2)                                                  # mean over the window queries
    padded = np.pad(s, ((0, 0), (0, 0), (kernel // 2, kernel // 2)))
    pooled = np.stack([padded[..., j:j + kernel].sum(-1) / kernel for j in range(P)], -1)
    per_kv = pooled.reshape(B, Hkv, G, P).mean(2)
    full = np.concatenate([per_kv, np.full((B, Hkv, w), per_kv.max() + 1)], -1)
    tokens = full.sum(1)                                           # [B, L]
    chunks = [(m * chunk, min((m + 1) * chunk, L)) for m in range(-(-L // chunk))]
    n_keep = max(1, int(len(chunks) * keep_fraction))
    out = []
    for b in range(B):
        means = [tokens[b, lo:hi].mean() for lo, hi in chunks]
        best = _top(means, n_keep)
        out.append(sorted(j for m in best for j in range(*chunks[m])))
    return out, tokens


@pytest.mark.parametrize("L, w, chunk, frac", [(300, 64, 20, 0.5), (257, 64, 20, 0.3), (130, 16, 20, 0.1),
                                               (200, 64, 20, 0.9), (99, 8, 7, 0.25)])
def test_chunkkv_kvpress_mode_matches_kvpress_semantics(L, w, chunk, frac):
    q, k = _qk(1, 6, 2, w, L, 16, seed=L * 3 + w)
    idx = chunkkv.select(q, k, budget=0, method="chunkkv-kvpress", chunk_size=chunk, keep_fraction=frac,
                         pool_kernel=5)
    want, tokens = _kvpress_reference(q, k, frac, chunk)
    assert idx[0].tolist() == want[0]
    # kvpress keeps whole chunks: never more than asked, and often fewer
    assert len(want[0]) <= max(chunk, math.ceil(frac * L) + chunk)


def test_chunkkv_kvpress_keeps_fewer_tokens_than_asked_and_chunkkv_exact():
    q, k = _qk(1, 4, 2, 64, 1000, 16, seed=5)
    kv = chunkkv.select(q, k, budget=0, method="chunkkv-kvpress", chunk_size=20, keep_fraction=0.1)
    exact = chunkkv.select(q, k, budget=100, chunk_size=20)
    assert kv.shape[1] == 100 and exact.shape[1] == 100  # 50 chunks * 0.1 = 5 chunks of 20
    kv = chunkkv.select(q, k, budget=0, method="chunkkv-kvpress", chunk_size=20, keep_fraction=0.119)
    assert kv.shape[1] == 100  # int(50 * 0.119) = 5 chunks: 100 tokens, not 119
    assert chunkkv.select(q, k, budget=119, chunk_size=20).shape[1] == 119


@pytest.mark.parametrize("budget, window, prefix, layers", [(100, 32, 900, 8), (64, 16, 100, 30), (40, 8, 60, 5),
                                                            (500, 32, 600, 12), (40, 40, 100, 4)])
def test_pyramid_budgets_shrink_with_depth_and_keep_the_total(budget, window, prefix, layers):
    b = pyramid_budgets(budget, window, prefix, layers)
    assert len(b) == layers
    assert all(x >= y for x, y in zip(b, b[1:]))
    assert all(window <= x <= window + prefix for x in b)
    assert abs(sum(b) - layers * budget) <= layers  # rounding only
    if budget > window and layers > 1:
        assert b[0] > b[-1]


# ------------------------------------------------------------------ end to end


def _prompt(batch, length, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("reuse", [1, 2])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_method_runs_through_patch_and_generate(method, reuse, attn):
    if METHODS[method].pyramid and reuse > 1:
        with pytest.raises(ValueError, match="pyramidkv"):
            chunkkv.patch(tiny_model("llama", attn), keep_ratio=0.3, method=method, reuse=reuse)
        return
    model = tiny_model("llama", attn, num_hidden_layers=4)
    ids = _prompt(2, 160, seed=3)
    cache = DynamicCache(config=model.config)
    with chunkkv.patch(model, keep_ratio=0.3, method=method, reuse=reuse) as h:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_cache(cache), max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, 165)
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    assert all(isinstance(layer, CompressedLayer) for layer in cache.layers)
    assert h.stats.selections == -(-4 // reuse)
    if METHODS[method].pyramid:
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
    else:
        assert len(set(lengths)) == 1 and lengths[0] <= 48 + 4
    for i, layer in enumerate(cache.layers):  # followers hold their leader's positions
        assert torch.equal(layer_positions(layer), layer_positions(cache.layers[i - i % reuse]))


def test_pyramidkv_with_flat_schedule_equals_snapkv():
    model = tiny_model("llama", "eager")
    ids = _prompt(1, 150, seed=4)
    outs = []
    for method, extra in [("snapkv", {}), ("pyramidkv", {"beta": 1.0})]:
        with chunkkv.patch(model, budget=50, window=16, method=method, **extra):
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pyramidkv_left_padded_rows_match_their_unpadded_runs(attn):
    """Layers of unequal length share one mask: the per-layer trimming must keep padding right."""
    model = tiny_model("llama", attn)
    rows = [_prompt(1, 120, seed=8), _prompt(1, 90, seed=9)]
    batch = torch.zeros(2, 120, dtype=torch.long)
    mask = torch.zeros(2, 120, dtype=torch.long)
    for r, ids in enumerate(rows):
        batch[r, 120 - ids.shape[1]:] = ids[0]
        mask[r, 120 - ids.shape[1]:] = 1
    kw = dict(budget=40, window=8, method="pyramidkv")
    with chunkkv.patch(model, **kw):
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 120:]
        for r, ids in enumerate(rows):
            single = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                    pad_token_id=0)[:, ids.shape[1]:]
            assert torch.equal(out[r], single[0]), f"row {r}"
