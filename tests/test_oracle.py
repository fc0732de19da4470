"""The integration oracle: every compressed layer against the model's own attention.

An unpatched eager forward with ``output_attentions=True`` gives every layer's attention
probabilities. ChunkKV's token scores are their sums over the query heads of a KV head and the
last ``window`` queries (prefix tokens only); the plain reference (`reference.py`) then picks the
chunks. The patched model must keep, in every full-attention layer, exactly what its reuse leader's
attention selects. Nothing here uses chunkkv's own queries, scores or grouping, so a wrong RoPE
offset, a skipped q-norm, a wrong query slice of a fused projection, reuse groups counted over the
wrong layers or a layer gathering with another group's indices all change what is compared.

Scoring follows the plain softmax of the rotated queries and keys (as in the paper, kvpress and
SnapKV). Gemma 2's logit soft-capping (tanh at 50) is *not* applied when scoring: the Gemma 2 cases
build the oracle with soft-capping off, so that the model's probabilities are exactly those softmaxes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import chunkkv
import reference as ref
from chunkkv.cache import CompressedLayer
from tiny_models import tiny_model, with_cache

torch.set_grad_enabled(False)

# families whose attention the oracle covers, with what makes each one interesting
ORACLE_FAMILIES = {
    "llama": {},
    "qwen3": {},                                   # q_norm / k_norm (given non-trivial weights below)
    "phi3": {},                                    # fused qkv_proj
    "gemma2": {"num_hidden_layers": 6, "attn_logit_softcapping": None},   # sliding, full, sliding, ...
    "gemma3": {"num_hidden_layers": 6,             # sliding layers between full ones
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention",
                               "full_attention", "sliding_attention"]},
}


def oracle_model(family: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_model(family, "eager", seed=seed, **ORACLE_FAMILIES[family])
    g = torch.Generator().manual_seed(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3/Gemma 3: make the norms matter
            p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 0.5)
    return model


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given lengths: (ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, L - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[r, L - n:] = 1
    return ids, mask


def full_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None)
    n = model.config.num_hidden_layers
    return [i for i in range(n) if not types or types[i] == "full_attention"]


def attention_probs(model, ids, mask) -> list[np.ndarray]:
    """Every layer's attention probabilities [B, Hq, L, L] (float64) from an unpatched eager forward."""
    out = model(ids, attention_mask=mask, output_attentions=True, use_cache=False)
    return [a.to(torch.float64).numpy() for a in out.attentions]


def head_scores(probs: np.ndarray, Hkv: int, queries: slice, prefix: int) -> np.ndarray:
    """[B, Hkv, prefix]: the probabilities the given queries pay each prefix key, summed over each KV
    head's query heads (query head h reads KV head h // G)."""
    B, Hq = probs.shape[:2]
    s = probs[:, :, queries, :prefix].sum(axis=2)                  # [B, Hq, prefix]
    return s.reshape(B, Hkv, Hq // Hkv, prefix).sum(axis=2)


def expected_positions(method: str, probs: np.ndarray, Hkv: int, budget: int, window: int, chunk: int,
                       starts: list[int]) -> np.ndarray:
    """What the method keeps given the layer's attention, from reference.py's selection rules."""
    B, _, L, _ = probs.shape
    if method == "h2o":  # heavy hitters: every prompt query's attention, the last `window` tokens kept
        s = head_scores(probs, Hkv, slice(0, L), L - window)
        out = np.empty((B, Hkv, min(budget, L)), dtype=np.int64)
        for b in range(B):
            for g in range(Hkv):
                if budget >= L - starts[b]:
                    out[b, g] = np.arange(L - out.shape[-1], L)
                    continue
                row = s[b, g, starts[b]:]
                best = starts[b] + ref._rank(row)[:budget - window]
                out[b, g] = np.sort(np.concatenate([best, np.arange(L - window, L)]))
        return out
    s = head_scores(probs, Hkv, slice(L - window, L), L - window)
    q_shape, k_shape = np.empty((B, 1, window, 1)), np.empty((B, Hkv, L, 1))
    if method == "chunkkv":
        return ref.select(q_shape, k_shape, budget=budget, chunk_size=chunk, token_scores=s, row_starts=starts)
    if method in ("snapkv", "pyramidkv"):
        return ref.select(q_shape, k_shape, budget=budget, method="snapkv", pool_kernel=5, pool="avg",
                          per_head=True, token_scores=s, row_starts=starts)
    raise ValueError(method)


def assert_same_selection(got: np.ndarray, want: np.ndarray, weights: np.ndarray, what: str) -> None:
    """Positions must be equal; a row may differ only at a float near-tie: the attention mass the two
    selections keep (summed per row over `weights`, the oracle's token scores) then agrees to 1e-6."""
    assert got.shape == want.shape, f"{what}: kept {got.shape}, expected {want.shape}"
    for r in np.ndindex(got.shape[:-1]):
        if np.array_equal(got[r], want[r]):
            continue
        w = weights[r]
        mass = lambda idx: float(w[idx[idx < len(w)]].sum())  # noqa: E731
        assert math.isclose(mass(got[r]), mass(want[r]), rel_tol=1e-6), (
            f"{what}, row {r}: kept {got[r].tolist()}, the model's attention selects {want[r].tolist()}")


def check_against_oracle(family: str, method: str, reuse: int, lengths: list[int], budget: int,
                         window: int = 8, chunk: int = 5, seed: int = 0) -> chunkkv.ChunkKVPatch:
    model = oracle_model(family, seed)
    ids, mask = padded_batch(lengths, seed)
    L, B = ids.shape[1], ids.shape[0]
    probs = attention_probs(model, ids, mask)
    Hkv = model.config.num_key_value_heads
    starts = [L - n for n in lengths]
    per_head = method != "chunkkv"
    with chunkkv.patch(model, budget=budget, window=window, chunk_size=chunk, reuse=reuse, method=method) as h:
        cache = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, **with_cache(cache), use_cache=True)
    layers = full_layers(model)
    n_layers = len(layers)
    budgets = [budget] * n_layers
    if method == "pyramidkv":
        budgets = chunkkv.compressors.pyramid_budgets(budget, window, L - window, n_layers)
    for rank, layer_idx in enumerate(layers):
        leader = layers[rank - rank % reuse]
        layer = cache.layers[layer_idx]
        assert isinstance(layer, CompressedLayer), f"layer {layer_idx} was not compressed"
        want = expected_positions(method, probs[leader], Hkv, budgets[rank], window, chunk, starts)
        got = layer.positions().numpy()
        if not per_head:
            weights = head_scores(probs[leader], Hkv, slice(L - window, L), L).sum(axis=1)
        elif method == "h2o":
            weights = head_scores(probs[leader], Hkv, slice(0, L), L)
        else:
            weights = head_scores(probs[leader], Hkv, slice(L - window, L), L)
        assert_same_selection(got, want, weights, f"{family} {method} reuse={reuse} layer {layer_idx} (leader "
                                                  f"{leader})")
    for i, layer in enumerate(cache.layers):
        if i not in layers:
            assert not isinstance(layer, CompressedLayer), f"sliding layer {i} was compressed"
    assert h.stats.selections == -(-n_layers // reuse), "one selection per reuse group"
    assert h.stats.gathers == n_layers
    return h


@pytest.mark.parametrize("reuse", [1, 2, 3])
@pytest.mark.parametrize("family", sorted(ORACLE_FAMILIES))
def test_every_layer_keeps_what_its_leaders_attention_selects(family, reuse):
    check_against_oracle(family, "chunkkv", reuse, [140, 140], budget=44, seed=reuse)


@pytest.mark.parametrize("family", sorted(ORACLE_FAMILIES))
def test_left_padded_batch_rows_select_from_their_own_attention(family):
    check_against_oracle(family, "chunkkv", 2, [150, 97, 61, 30], budget=47, seed=7)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "h2o"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_per_head_methods_follow_their_own_rule_on_the_attention(family, method):
    check_against_oracle(family, method, 1, [130, 88], budget=40, seed=3)


def test_oracle_cases_make_real_multi_chunk_selections():
    """The cases above are not trivial: budget < L, several whole chunks and a cut one per row."""
    model = oracle_model("llama")
    ids, mask = padded_batch([140, 140], 1)
    probs = attention_probs(model, ids, mask)
    s = head_scores(probs[0], model.config.num_key_value_heads, slice(140 - 8, 140), 132).sum(axis=1)
    walk = ref.chunkkv_walk(s[0], 44 - 8, 5)
    assert len(walk) >= 5 and len(walk[-1][1]) < 5
