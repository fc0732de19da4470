"""The converted-checkpoint cache of GGUF models (chunkkv.models.converted_dir): a load from the cache gives the
same model and tokenizer as parsing the GGUF file (weights bit for bit, config, generation config, encodings,
chat template, stop tokens, greedy tokens), on the real SmolLM2 file; a stale or foreign folder is never read."""
from __future__ import annotations

import json

import pytest
from shared_data import require_smollm2

pytest.importorskip("transformers")
import torch  # noqa: E402

import chunkkv.models as models  # noqa: E402
from chunkkv.eval.harness import stop_token_ids  # noqa: E402

TEXTS = [
    "Hello world",
    "  leading spaces, tabs\tand\nnew\n\nlines  ",
    "Hello, wörld! Ça va? 日本語 🙂 段落3",
    "<|im_start|>user\nspecial tokens as text</s><|im_end|>",
    "def f(x):\n    return x ** 2\n",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _config(model) -> dict:
    d = model.config.to_dict()
    d.pop("_name_or_path", None)  # where it was read from
    d.pop("architectures", None)  # save_pretrained records the class, which assert_same compares itself
    return d


def _greedy(model, tok, n: int = 8) -> list[int]:
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def assert_same(a, b) -> None:
    (ma, ta), (mb, tb) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert type(ma) is type(mb)
    assert _config(ma) == _config(mb)
    assert ma.generation_config.to_dict() == mb.generation_config.to_dict()
    assert [ta(t).input_ids for t in TEXTS] == [tb(t).input_ids for t in TEXTS]
    assert ta.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tb.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ta.all_special_ids == tb.all_special_ids and len(ta) == len(tb)
    assert stop_token_ids(ma, ta) == stop_token_ids(mb, tb)
    assert _greedy(ma, ta) == _greedy(mb, tb)


def test_cached_load_equals_the_gguf_parse(cache, monkeypatch):
    require_smollm2()
    direct = models.load_smollm2(convert_cache=False)
    assert not cache.exists()
    first = models.load_smollm2()  # parses the GGUF file once, keeps the checkpoint
    folder = models.converted_dir(models.smollm2_gguf_path())
    note = json.loads((folder / "chunkkv-converted.json").read_text())
    assert note["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(note["sha256"]) == 64
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    def no_parse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed although its conversion is cached")

    monkeypatch.setattr(models, "_read_gguf", no_parse)
    second = models.load_smollm2()
    assert_same(direct, first)
    assert_same(direct, second)
    # a dtype other than the cached fp32 is a cast of the same weights
    half, _ = models.load_smollm2(dtype=torch.bfloat16)
    w = direct[0].model.embed_tokens.weight
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(half.model.embed_tokens.weight, w.to(torch.bfloat16))


def test_a_folder_without_the_note_is_rebuilt(cache):
    require_smollm2()
    folder = models.converted_dir(models.smollm2_gguf_path())
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # left by something else: not a conversion to trust
    model, tok = models.load_smollm2()
    assert (folder / "chunkkv-converted.json").is_file()
    assert model.config.num_hidden_layers == 30 and tok("Hello").input_ids


def test_the_folder_names_the_file_hash_and_transformers_version(cache, tmp_path, monkeypatch):
    import transformers

    a, b = tmp_path / "m.gguf", tmp_path / "n" / "m.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    da, db = models.converted_dir(a), models.converted_dir(b)
    assert da != db and da.parent == cache / "converted"
    assert da.name.endswith("-transformers-" + transformers.__version__)
    monkeypatch.setattr(transformers, "__version__", "0.0.0-other")
    assert models.converted_dir(a) != da


def test_an_unwritable_cache_loads_from_the_gguf_file_with_a_warning(tmp_path, monkeypatch):
    require_smollm2()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("CHUNKKV_CACHE", str(blocker))
    with pytest.warns(RuntimeWarning, match="chunkkv: could not keep the converted model"):
        model, tok = models.load_smollm2()
    assert model.config.num_hidden_layers == 30 and tok("Hello").input_ids
