"""Tensor parallel and multi-device models: every rank keeps what one process keeps.

A tiny Llama (4 query heads, 2 KV heads) is saved to a temporary folder and loaded twice: by
`torchrun --nproc_per_node 2 tests/parallel_worker.py` with transformers' tensor parallelism over
gloo (each rank holds one KV head; each writes what it kept), and here in one process. The oracle
is the single process: each rank's kept positions and stored keys must equal the single-process
cache's positions and keys of the heads that rank holds, and `generate` must decode the same tokens.
Before ranks combined their scores, each rank kept the positions its own heads scored highest.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from chunkkv.patching import RankScores, Selection, compress_layer, window_queries  # noqa: E402
from parallel_cases import CASES, run_case, run_cases  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

WORLD = 2
HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900


def _need_distributed() -> None:
    import importlib.util

    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if importlib.util.find_spec("accelerate") is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("accelerate (in chunkkv's test extra) is missing: transformers needs it for tp_plan")
        pytest.skip("accelerate is not installed (pip install -e '.[test]'); transformers needs it for tp_plan")
    if not hasattr(transformers, "DistributedConfig") and "tp_plan" not in \
            transformers.PreTrainedModel.from_pretrained.__doc__:
        pytest.skip(f"transformers {transformers.__version__} has no tensor parallel loading")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama_tp")
    tiny_model("llama", attn="eager", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ranks(model_dir, tmp_path_factory) -> list[dict]:
    """What each tensor-parallel rank kept (one torchrun for the whole module)."""
    _need_distributed()
    out = tmp_path_factory.mktemp("tp_ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHUNKKV_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(HERE / "parallel_worker.py"), str(model_dir), str(out)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s: {(e.stderr or '')[-3000:]}")
    if run.returncode != 0:
        pytest.fail(f"torchrun failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-6000:]}")
    results = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["tp_size"] for r in results] == [WORLD] * WORLD, "the worker's model is not tensor parallel"
    return results


@pytest.fixture(scope="module")
def single(model_dir) -> dict:
    """The same cases on the same weights in one process."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return run_cases(model)


def _heads(rank: int, local: int) -> slice:
    # transformers' colwise plan shards k_proj's output features in rank order: rank r holds
    # KV heads [r * local, (r + 1) * local)
    return slice(rank * local, (rank + 1) * local)


PREFILL = [name for name, (_, _, what) in CASES.items() if what == "prefill" and name != "chunkkv_kvpress"]


@pytest.mark.parametrize("case", PREFILL)
def test_rank_keeps_the_single_process_selection(case, ranks, single):
    want = single[case]
    assert "positions" in want, want
    n_kv = want["keys"][0].shape[1]
    for r, result in enumerate(ranks):
        got = result[case]
        assert "positions" in got, f"rank {r}: {got}"
        for layer, (gp, wp, gk, wk) in enumerate(zip(got["positions"], want["positions"], got["keys"], want["keys"])):
            local = gk.shape[1]
            assert local * WORLD == n_kv, f"rank {r} holds {local} of {n_kv} KV heads"
            heads = _heads(r, local)
            wp = wp[:, heads] if wp.ndim == 3 else wp  # per-head selections keep each head's own positions
            assert torch.equal(gp, wp), (f"{case}, rank {r}, layer {layer}: kept {gp.tolist()}, one process keeps "
                                         f"{wp.tolist()}")
            assert gk.shape == wk[:, heads].shape
            torch.testing.assert_close(gk, wk[:, heads], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{case}, rank {r}, layer {layer}: {m}")


@pytest.mark.parametrize("case", ["chunkkv_reuse1", "chunkkv_reuse2", "chunkkv_padded", "snapkv_shared", "h2o_shared",
                                  "prototype_shared"])
def test_shared_selection_is_the_same_on_every_rank(case, ranks):
    first = ranks[0][case]["positions"]
    for r in range(1, WORLD):
        for layer, (a, b) in enumerate(zip(first, ranks[r][case]["positions"])):
            assert torch.equal(a, b), f"{case}, layer {layer}: rank 0 kept {a.tolist()}, rank {r} {b.tolist()}"


def test_generate_decodes_the_single_process_tokens(ranks, single):
    want = single["generate_reuse2_padded"]["tokens"]
    for r, result in enumerate(ranks):
        assert torch.equal(result["generate_reuse2_padded"]["tokens"], want), f"rank {r}"


def test_kvpress_is_refused_under_tensor_parallelism(ranks, single):
    assert "positions" in single["chunkkv_kvpress"]  # one process runs it
    for r, result in enumerate(ranks):
        msg = result["chunkkv_kvpress"].get("error", "")
        assert "chunkkv" in msg and "chunkkv-kvpress" in msg and "tensor parallelism" in msg, f"rank {r}: {msg!r}"


# -- device_map (layers on several devices) ----------------------------------------------------------
def test_device_map_with_offloaded_layers_keeps_what_one_device_keeps(model_dir, tmp_path):
    """A model dispatched by accelerate with a per-layer device map (layers 0-1 on the CPU, 2-3
    offloaded to disk: their weights are loaded by accelerate's hooks around each layer's forward,
    so a reuse leader at layer 2 projects its queries inside them) keeps the same tokens and decodes
    the same as the plain model. tests_gpu/test_device_map.py splits the layers over a GPU and the CPU."""
    pytest.importorskip("accelerate")
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n = plain.config.num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)}}
    mapped = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map,
                                                               offload_folder=str(tmp_path)).eval()
    assert all(hasattr(layer, "_hf_hook") for layer in mapped.model.layers), "accelerate did not dispatch the model"
    for case in ("chunkkv_reuse2", "chunkkv_padded", "snapkv_per_head", "generate_reuse2_padded"):
        args, kind, what = CASES[case]
        want, got = run_case(plain, args, kind, what), run_case(mapped, args, kind, what)
        assert want.keys() == got.keys(), (want.keys(), got.keys())
        for key in want:
            pairs = zip(want[key], got[key]) if isinstance(want[key], list) else [(want[key], got[key])]
            for i, (a, b) in enumerate(pairs):
                assert torch.equal(a, b), f"{case}: {key} [{i}] differs under device_map"


def test_follower_gathers_the_leaders_indices():
    """compress_layer gathers a follower's keys at its leader's indices (it moves them to the
    follower's device first when they differ: tests_gpu/test_device_map.py covers that move)."""
    from transformers.cache_utils import DynamicLayer

    torch.manual_seed(0)
    layer = DynamicLayer()
    k, v = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8)
    layer.update(k, v)
    idx = torch.tensor([[0, 3, 4, 20, 29], [1, 2, 5, 6, 29]])
    kept = compress_layer(layer, Selection(idx, None, 30))
    assert kept.keys.device == k.device
    torch.testing.assert_close(kept.keys, torch.take_along_dim(k, idx[:, None, :, None], dim=2))
    assert torch.equal(kept.positions(), idx)



def test_split_heads_without_a_process_group_are_refused():
    """A layer whose q_proj gives fewer heads than the config names, with no sharded weight to find
    the other ranks by, is an error rather than a selection from some of the heads."""
    attn = tiny_model("llama").model.layers[0].self_attn
    assert RankScores.of(attn, attn.config.num_attention_heads) is None  # all heads here: nothing to combine
    attn.q_proj = torch.nn.Linear(64, 2 * attn.head_dim, bias=False)
    with pytest.raises(ValueError, match=r"chunkkv: layer 0 holds 2 of 4 query heads"):
        RankScores.of(attn, 2)


def test_a_sharded_fused_qkv_proj_is_refused():
    attn = tiny_model("phi3").model.layers[0].self_attn
    hidden = torch.randn(1, 6, 64)
    window_queries(attn, hidden, {"position_embeddings": (torch.ones(1, 6, 16), torch.zeros(1, 6, 16))}, 3)
    attn.qkv_proj = torch.nn.Linear(64, attn.qkv_proj.out_features // 2, bias=False)  # one rank's half
    with pytest.raises(ValueError, match=r"chunkkv: Phi3Attention.qkv_proj gives 64 features.*not supported"):
        window_queries(attn, hidden, {}, 3)
