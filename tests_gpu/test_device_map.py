"""chunkkv.patch on a model split over devices with device_map (needs a GPU; not under tests/).

Run: python -m pytest tests_gpu/test_device_map.py -q   (after pip install -e ".[hf,test]" with CUDA)

A tiny Llama's layers are split between cuda:0 and the CPU (and cuda:0 / cuda:1 when two GPUs are
present), with reuse groups that straddle the split, so a leader's kept indices must move to a
follower on another device. Oracle: the same weights entirely on the CPU. Each layer's cache must
stay on its layer's device, followers keep their leader's positions, and the kept positions and the
tokens generate() decodes equal the CPU model's (TF32 is off; a difference must be a float near-tie
of the two devices' scores before it is accepted).

Status: written without a GPU at hand; it has not run yet.
"""
from __future__ import annotations

import os
import sys

import pytest

torch = pytest.importorskip("torch", reason="the device_map tests need torch")
transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("the device_map tests need a GPU: torch.cuda.is_available() is False", allow_module_level=True)
pytest.importorskip("accelerate", reason="device_map loading needs accelerate")

import chunkkv  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from parallel_cases import CASES, run_case  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

LAYERS = 4


def _splits() -> list[tuple[str, list[str], str]]:
    """(name, device of each layer, device of embeddings/head)."""
    out = [("gpu_then_cpu", ["cuda:0", "cuda:0", "cpu", "cpu"], "cuda:0"),
           ("cpu_then_gpu", ["cpu", "cuda:0", "cuda:0", "cuda:0"], "cpu")]
    if torch.cuda.device_count() >= 2:
        out.append(("two_gpus", ["cuda:0", "cuda:0", "cuda:1", "cuda:1"], "cuda:0"))
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    assert chunkkv.build_info()["cuda"], "chunkkv was built without CUDA"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = tmp_path_factory.mktemp("tiny_llama_devices")
    tiny_model("llama", attn="eager", seed=0, num_hidden_layers=LAYERS).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("split", _splits(), ids=lambda s: s[0])
@pytest.mark.parametrize("reuse", [3, 4])  # groups {0,1,2},{3} and {0,1,2,3}: both straddle every split
@pytest.mark.parametrize("kind", ["single", "padded"])
def test_followers_on_other_devices_keep_their_leaders_positions(model_dir, split, reuse, kind):
    _, layer_devices, edge = split
    device_map = {"model.embed_tokens": edge, "model.rotary_emb": edge, "model.norm": layer_devices[-1],
                  "lm_head": layer_devices[-1], **{f"model.layers.{i}": d for i, d in enumerate(layer_devices)}}
    mapped = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                               device_map=device_map).eval()
    cpu = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    args = dict(budget=64, reuse=reuse)
    got, want = run_case(mapped, args, kind, "prefill"), run_case(cpu, args, kind, "prefill")
    for i, (pos, keys) in enumerate(zip(got["positions"], got["keys"])):
        assert keys.device == torch.device(layer_devices[i]), f"layer {i}: cache on {keys.device}"
        leader = (i // reuse) * reuse
        assert torch.equal(pos.cpu(), got["positions"][leader].cpu()), f"layer {i} differs from its leader {leader}"
        assert torch.equal(pos.cpu(), want["positions"][i]), \
            f"layer {i}: {pos.tolist()} vs CPU {want['positions'][i].tolist()}"
        torch.testing.assert_close(keys.cpu(), want["keys"][i], rtol=1e-4, atol=1e-4)
    gen_args, gen_kind, _ = CASES["generate_reuse2_padded"]
    tokens = run_case(mapped, {**gen_args, "reuse": reuse}, gen_kind, "generate")["tokens"]
    assert torch.equal(tokens.cpu(), run_case(cpu, {**gen_args, "reuse": reuse}, gen_kind, "generate")["tokens"])
