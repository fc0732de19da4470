"""The chunkkv options at engine start (no engine is started), and the pieces that need no engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import chunkkv
from chunkkv.vllm.config import ChunkKVConfigError, parse
from chunkkv.vllm.selection import select_positions
from conftest import smollm2


# -- parsing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, key", [
    ({"budget": 64, "windw": 8}, "windw"),
    ({"budget": 64, "keep_ratio": 0.1}, "budget"),
    ({}, "keep_ratio"),
    ({"budget": 64, "method": "snapkv"}, "method"),
    ({"budget": 64, "method": "pyramidkv"}, "method"),
    ({"budget": 64, "method": "h2o"}, "method"),
    ({"budget": 64, "method": "chunkkv-kvpress"}, "method"),
    ({"budget": 64, "method": "nope"}, "method"),
    ({"budget": 64, "per_head": True}, "per_head"),
    ({"budget": 8, "window": 16}, "budget"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"budget": 64, "reuse": 0}, "reuse"),
    ({"budget": 64, "chunk_size": "10"}, "chunk_size"),
])
def test_bad_options_name_chunkkv_and_the_key(options, key):
    with pytest.raises(ChunkKVConfigError, match=rf"chunkkv.*'{key}'"):
        parse({"chunkkv": options})


def test_no_key_means_no_config():
    assert parse(None) is None and parse({}) is None and parse({"other": 1}) is None


@pytest.mark.parametrize("options", [{"budget": 100, "window": 16}, {"keep_ratio": 0.1, "window": 32},
                                     {"keep_ratio": 0.5, "window": 8}, {"keep_ratio": 0.01, "window": 32}])
def test_kept_tokens_follow_chunkkv_patch(options):
    from chunkkv.patching import PatchConfig

    cfg = parse({"chunkkv": options})
    patch = PatchConfig.create(budget=options.get("budget"), keep_ratio=options.get("keep_ratio"),
                               window=options["window"])
    for length in (1, 7, 16, 31, 32, 33, 99, 100, 101, 1000, 4000):
        budget = patch.row_budget(length, min(patch.window, length))
        assert cfg.kept_tokens(length) == (budget if length > budget else None)


# -- selection from given scores (the tensor-parallel path) -------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_summed_scores_select_what_the_core_selects(seed):
    rng = np.random.default_rng(seed)
    heads_kv, group = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    length, window = int(rng.integers(40, 400)), int(rng.integers(1, 33))
    budget = int(rng.integers(window, length + 5))
    chunk = int(rng.integers(1, 17))
    q = torch.from_numpy(rng.standard_normal((1, heads_kv * group, window, 32)).astype(np.float32) * 2)
    k = torch.from_numpy(rng.standard_normal((1, heads_kv, length, 32)).astype(np.float32) * 2)
    want = chunkkv.select(q, k, budget=budget, chunk_size=chunk)[0].numpy()
    scores = chunkkv.score(q, k)[0]
    summed = scores[0].clone()
    for h in range(1, heads_kv):
        summed += scores[h]
    got = chunkkv.select_from_scores(summed[None], length=length, budget=min(budget, length), chunk_size=chunk)[0]
    assert got.tolist() == want.tolist()


def test_select_positions_split_heads_equal_one_process():
    """Two 'ranks' holding one KV head each, gathering their scores, keep what one process keeps."""
    rng = np.random.default_rng(7)
    cfg = parse({"chunkkv": {"budget": 40, "window": 8, "chunk_size": 5}})
    q = torch.from_numpy(rng.standard_normal((8, 4, 32)).astype(np.float32))      # [w, Hq, D]
    k = torch.from_numpy(rng.standard_normal((200, 2, 32)).astype(np.float32))    # [L, Hkv, D]
    single = select_positions(cfg, q, k, 40, 32 ** -0.5)
    local = [chunkkv.score(q[:, 2 * r: 2 * r + 2].permute(1, 0, 2)[None], k[:, r: r + 1].permute(1, 0, 2)[None],
                           scale=32 ** -0.5)[0] for r in range(2)]
    for r in range(2):
        got = select_positions(cfg, q[:, 2 * r: 2 * r + 2], k[:, r: r + 1], 40, 32 ** -0.5,
                               gather_heads=lambda x: torch.cat(local, 0))
        assert got.tolist() == single.tolist()


# -- engine start ------------------------------------------------------------------------------------------
def _engine_config(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=smollm2(), dtype="float32", max_model_len=1024, **kwargs).create_engine_config()


def test_without_the_key_vllm_is_unchanged():
    config = _engine_config()
    assert config.scheduler_config.scheduler_cls in (None, "vllm.v1.core.sched.scheduler.Scheduler") or \
        "chunkkv" not in str(config.scheduler_config.scheduler_cls)
    assert "chunkkv" not in config.parallel_config.worker_cls
    assert config.cache_config.enable_prefix_caching


def test_engine_start_sets_up_and_turns_off_conflicts():
    config = _engine_config(additional_config={"chunkkv": {"budget": 64}}, max_num_batched_tokens=256)
    assert config.scheduler_config.scheduler_cls == "chunkkv.vllm.scheduler.ChunkKVScheduler"
    assert config.parallel_config.worker_cls == "chunkkv.vllm.worker.ChunkKVWorker"
    assert not config.cache_config.enable_prefix_caching
    assert config.scheduler_config.max_num_batched_tokens >= 1024


@pytest.mark.parametrize("options, key", [({"budget": 64, "bogus": 1}, "bogus"),
                                          ({"budget": 64, "keep_ratio": 0.1}, "budget"),
                                          ({"budget": 64, "method": "snapkv"}, "method")])
def test_bad_config_fails_at_engine_start(options, key):
    with pytest.raises(ChunkKVConfigError, match=rf"chunkkv.*'{key}'"):
        _engine_config(additional_config={"chunkkv": options})


@pytest.mark.parametrize("kwargs, setting", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
     "speculative_config"),
    ({"scheduler_cls": "my.Scheduler"}, "scheduler_cls"),
    ({"long_prefill_token_threshold": 128}, "long_prefill_token_threshold"),
])
def test_conflicting_settings_are_refused(kwargs, setting):
    with pytest.raises(ChunkKVConfigError, match=rf"chunkkv.*{setting}"):
        _engine_config(additional_config={"chunkkv": {"budget": 64}}, **kwargs)
