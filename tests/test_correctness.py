"""No silent wrong results: threads, left-padded batches with keep_ratio, multi-turn chats,
torch.compile, unknown arguments, rollbacks, dtypes."""
from __future__ import annotations

import math
import sys
import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import chunkkv
from chunkkv.cache import CompressedLayer
from tiny_models import tiny_model, with_cache

torch.set_grad_enabled(False)


def _prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, length), generator=g)


def _generate(model, ids, mask=None, n=6, cache=None, **kw):
    cache = DynamicCache(config=model.config) if cache is None else cache
    out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=n,
                         do_sample=False, pad_token_id=0, **with_cache(cache), **kw)
    return out, cache


# -- 1. threads ------------------------------------------------------------------------------------
def test_threads_sharing_one_patched_model_get_what_each_call_gets_alone():
    """8 threads, prompts of different lengths, 3 rounds: every output equals the sequential one.
    A tiny switch interval makes the threads interleave inside forwards (the old per-handle state
    then mixed masks, padding and reuse indices between threads)."""
    model = tiny_model("llama", "sdpa", num_hidden_layers=6)
    prompts = [_prompt(n, seed=n) for n in (60, 95, 130, 170, 210, 250, 77, 143)]
    with chunkkv.patch(model, keep_ratio=0.3, window=8, chunk_size=5, reuse=2):
        expected = [_generate(model, ids, n=8)[0] for ids in prompts]
        results: dict[tuple[int, int], torch.Tensor] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for rnd in range(3):
                    results[(i, rnd)] = _generate(model, prompts[(i + rnd) % len(prompts)], n=8)[0]
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(old)
    assert not errors, errors[0]
    for (i, rnd), out in results.items():
        assert torch.equal(out, expected[(i + rnd) % len(prompts)]), f"thread {i}, round {rnd}"
    assert len(results) == 24


# -- 2. keep_ratio in a left-padded batch ------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method, per_head", [("chunkkv", False), ("snapkv", True), ("pyramidkv", True)])
def test_keep_ratio_rows_of_a_padded_batch_equal_the_rows_alone(attn, method, per_head):
    model = tiny_model("llama", attn)
    lengths = [400, 100, 233]
    rows = [_prompt(n, seed=20 + n) for n in lengths]
    Lmax = max(lengths)
    batch = torch.zeros(len(rows), Lmax, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, ids in enumerate(rows):
        batch[r, Lmax - ids.shape[1]:] = ids[0]
        mask[r, Lmax - ids.shape[1]:] = 1
    kw = dict(keep_ratio=0.2, window=8, chunk_size=5, method=method)
    with chunkkv.patch(model, **kw):
        out, cache = _generate(model, batch, mask, n=6, output_logits=True, return_dict_in_generate=True)
        alone = [_generate(model, ids, n=6, output_logits=True, return_dict_in_generate=True) for ids in rows]
    for r, (single, single_cache) in enumerate(alone):
        kept = single_cache.layers[0].positions()
        assert kept.shape[-1] - 5 == math.ceil(0.2 * lengths[r]) or method == "pyramidkv"
        for t in range(min(len(out.logits), len(single.logits))):
            torch.testing.assert_close(out.logits[t][r], single.logits[t][0], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"row {r} step {t}: {m}")
        # the row's own prompt tokens: the same positions as alone, shifted by its padding
        shift = Lmax - lengths[r]
        batch_pos = cache.layers[0].positions()[r]
        for a, b in zip(batch_pos.reshape(-1, batch_pos.shape[-1]), kept[0].reshape(-1, kept.shape[-1])):
            assert torch.equal(a[(a >= shift) & (a < Lmax)] - shift, b[b < lengths[r]]), f"row {r}"


# -- 3. multi-turn chats ------------------------------------------------------------------------------
def _logits_seeing(model, ids, visible: dict[int, set]) -> torch.Tensor:
    """The unpatched model's logits at the last position when each position i attends to exactly
    the positions visible[i] (the same in every layer: the patch below uses reuse = layers)."""
    total = ids.shape[1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for i, seen in visible.items():
        allowed[i, sorted(seen)] = True
    mask = torch.zeros(1, 1, total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return model(ids, attention_mask=mask).logits[:, -1]


def test_three_turn_chat_holds_keep_ratio_of_all_tokens_seen():
    """The definition of a chat turn: after every prefill each layer holds ceil(keep_ratio * tokens
    seen); the tokens kept in earlier turns compete with the new turn's under the new window (a
    dropped token never comes back); every token attended to exactly what the cache held when it was
    processed, so the next logits equal the full model's with that visibility as its mask."""
    model = tiny_model("llama", "eager")
    ratio, window = 0.2, 8
    n_layers = model.config.num_hidden_layers
    history = torch.empty(1, 0, dtype=torch.long)
    previous: set[int] = set()
    visible: dict[int, set] = {}
    with chunkkv.patch(model, keep_ratio=ratio, window=window, chunk_size=5, reuse=n_layers) as h:
        cache = DynamicCache(config=model.config)
        for turn, n in enumerate([180, 150, 120]):
            history = torch.cat([history, _prompt(n, seed=40 + turn)], dim=1)
            seen_before = cache.get_seq_length()
            stored = set(cache.layers[0].positions()[0].tolist()) if turn else set()
            prefill_seen = history.shape[1]
            for i in range(seen_before, prefill_seen):
                visible[i] = stored | set(range(seen_before, i + 1))
            out, cache = _generate(model, history, n=3, cache=cache)
            pos = cache.layers[0].positions()[0]
            kept_at_prefill = pos[pos < prefill_seen]
            assert kept_at_prefill.numel() == math.ceil(ratio * prefill_seen), f"turn {turn}"
            assert kept_at_prefill[-window:].tolist() == list(range(prefill_seen - window, prefill_seen))
            old = {p for p in kept_at_prefill.tolist() if p < seen_before}
            assert old <= previous or turn == 0, f"turn {turn}: a dropped token came back"
            previous = set(kept_at_prefill.tolist())
            for p in range(prefill_seen, cache.get_seq_length()):
                visible[p] = previous | set(range(prefill_seen, p + 1))
            history = out
        assert h.stats.prefills == 3
    last = history.shape[1] - 1
    visible[last] = set(cache.layers[0].positions()[0].tolist()) | {last}
    step = model(history[:, -1:], **with_cache(cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, _logits_seeing(model, history, visible), rtol=1e-4, atol=1e-4)


def test_multi_turn_budget_counts_the_tokens_of_the_turn_only_once():
    model = tiny_model("llama")
    with chunkkv.patch(model, budget=40, window=8):
        cache = DynamicCache(config=model.config)
        out, cache = _generate(model, _prompt(120, 5), n=4, cache=cache)
        turn2 = torch.cat([out, _prompt(50, 6)], dim=1)
        _generate(model, turn2, n=4, cache=cache)
    assert cache.layers[0].keys.shape[-2] == 40 + 3


# -- 4. torch.compile ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["forward", "module"])
def test_torch_compile_fails_with_a_first_line_naming_chunkkv(how):
    torch._dynamo.reset()
    model = tiny_model("llama")
    ids = _prompt(60, 1)
    with chunkkv.patch(model, budget=20, window=8):
        if how == "forward":
            model.forward = torch.compile(model.forward)
            runner = model
        else:
            runner = torch.compile(model)
        with pytest.raises(RuntimeError) as info:
            runner(ids, **with_cache(DynamicCache(config=model.config)), use_cache=True)
    first = str(info.value).splitlines()[0]
    assert "chunkkv" in first and "torch.compile" in first, first
    torch._dynamo.reset()


# -- 5. unknown keyword arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, name", [(dict(budget=64, keepratio=0.2), "keepratio"), (dict(budget=64, foo=1), "foo"),
                                          (dict(budget=64, n_sink=2), "n_sink"),
                                          (dict(budget=64, method="snapkv", beta=3.0), "beta")])
def test_unknown_arguments_are_refused_at_patch(kwargs, name):
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=f"chunkkv.patch: unexpected argument '{name}'"):
        chunkkv.patch(model, **kwargs)
    assert not hasattr(model, "_chunkkv_patch")


def test_known_method_options_are_accepted():
    model = tiny_model("llama")
    for kw in (dict(method="streamingllm", n_sink=2), dict(method="pyramidkv", beta=10.0),
               dict(method="snapkv", pool_kernel=3, pool="max"), dict(method="random", seed=3)):
        chunkkv.patch(model, budget=32, window=8, **kw).remove()


# -- 6. transformers versions -----------------------------------------------------------------------------
def test_cache_kwarg_is_the_one_this_transformers_reads():
    """Passing the cache under the name chunkkv.cache_kwarg gives is honoured (older releases ignore
    `cache=` silently and build their own cache)."""
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    ids = _prompt(30, 2)
    model(ids, **{chunkkv.cache_kwarg(model): cache}, use_cache=True)
    assert cache.get_seq_length() == 30


# -- 7. errors that point at chunkkv -------------------------------------------------------------------------
def test_rollback_into_the_compressed_prompt_names_chunkkv():
    model = tiny_model("llama")
    with chunkkv.patch(model, budget=20, window=8):
        _, cache = _generate(model, _prompt(60, 3), n=4)
    layer = cache.layers[0]
    assert isinstance(layer, CompressedLayer)
    layer.crop(61)  # tokens appended after compression can go
    assert layer.get_seq_length() == 61 and layer.keys.shape[-2] == 21
    with pytest.raises(ValueError, match="chunkkv: cannot roll the compressed cache back"):
        cache.crop(50)


def test_assisted_decoding_fails_naming_chunkkv():
    model, assistant = tiny_model("llama"), tiny_model("llama", seed=1)
    ids = _prompt(60, 4)
    with chunkkv.patch(model, budget=20, window=8):
        with pytest.raises(ValueError, match="chunkkv"):
            model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=assistant, max_new_tokens=12,
                           do_sample=False, pad_token_id=0)


def test_mixed_query_and_key_dtypes_are_upcast_exactly():
    """fp16 queries with fp32 keys (or the reverse) score as both upcast to fp32 (documented)."""
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((1, 4, 8, 16), dtype=np.float32)).half()
    k = torch.from_numpy(rng.standard_normal((1, 2, 90, 16), dtype=np.float32))
    assert torch.equal(chunkkv.score(q, k), chunkkv.score(q.float(), k))
    assert torch.equal(chunkkv.score(q.float(), k.half()), chunkkv.score(q.float(), k.half().float()))


@pytest.mark.parametrize("dtype, name", [(np.float64, "float64"), (np.int32, "int32"), (np.uint8, "uint8"),
                                         (np.bool_, "bool")])
def test_a_dtype_chunkkv_cannot_take_is_named(dtype, name):
    q = np.zeros((1, 2, 1, 8), dtype=np.float32)
    with pytest.raises(TypeError, match=f"keys: expected float32, float16, bfloat16 or int64, got {name}$"):
        chunkkv.score(q, np.zeros((1, 1, 4, 8), dtype=dtype))
    with pytest.raises(TypeError, match="got float64$"):
        chunkkv.score(torch.zeros(1, 2, 1, 8, dtype=torch.float64), torch.zeros(1, 1, 4, 8))
