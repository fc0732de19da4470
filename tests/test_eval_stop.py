"""Stop tokens of the evaluation engine come from the tokenizer's special tokens and the generation config,
never from a token's text (issue 17: Qwen2's ordinary vocabulary entry "</s>" stopped decoding)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from chunkkv.eval import harness as C  # noqa: E402
from shared_data import require_smollm2  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

# "</s>" is an ordinary word here, as in Qwen2's BPE vocabulary; <|endoftext|> and <|im_end|> are special
VOCAB = {"<unk>": 0, "</s>": 1, "<|endoftext|>": 2, "<|im_end|>": 3, "hello": 4, "world": 5, "<|box_end|>": 6}


def qwen_like_tokenizer(eos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token=eos)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|box_end|>"]})
    return tok


def no_config_model(eos=None):
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


def test_ordinary_token_spelled_eos_does_not_stop():
    tok = qwen_like_tokenizer()
    assert tok.convert_tokens_to_ids("</s>") == 1 and tok.eos_token_id == 2
    ids = C.stop_token_ids(no_config_model(), tok)
    assert 1 not in ids                 # the ordinary "</s>"
    assert 2 in ids and 3 in ids        # eos and the special end-of-turn marker
    assert 6 not in ids                 # a special token that ends no turn


def test_generation_config_ids_int_or_list():
    tok = qwen_like_tokenizer()
    assert C.stop_token_ids(no_config_model(5), tok) == {2, 3, 5}
    assert C.stop_token_ids(no_config_model([4, 5]), tok) == {2, 3, 4, 5}
    with pytest.raises(TypeError, match="chunkkv.eval.*eos_token_id"):
        C.stop_token_ids(no_config_model("</s>"), tok)


def test_special_eos_spelled_like_llama():
    # where "</s>" *is* the declared eos (Llama 2, stories260K) it stops, because it is declared, not spelled
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert C.stop_token_ids(no_config_model(None), tok) == {2}


def test_engine_stops_on_eos_not_on_ordinary_token():
    tok = qwen_like_tokenizer()
    model = tiny_model("qwen2", attn="sdpa", vocab_size=len(VOCAB), eos_token_id=None, pad_token_id=None,
                       bos_token_id=None)
    model.generation_config.eos_token_id = None
    engine = C.Engine(model, tok, progress=False)
    job = C.Job("k", [4, 5], C.parse_methods("full")[0], None, 4)
    item = C._Item(job, cache=None, first=1)
    engine._finish(item, 1)              # "</s>" as text: an ordinary token, kept
    assert item.done == "" and item.tokens == [1]
    engine._finish(item, tok.eos_token_id)
    assert item.done == "eos" and item.tokens == [1]


def test_smollm2_tokenizer_stop_ids():
    require_smollm2()
    from transformers import AutoTokenizer

    from chunkkv.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    import os
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                        local_files_only=True)
    ids = C.stop_token_ids(no_config_model(), tok)
    vocab = tok.get_vocab()
    assert tok.eos_token_id in ids and vocab["<|im_end|>"] in ids and vocab["<|endoftext|>"] in ids
    # every stop id is a token the tokenizer declares special
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    assert ids <= special
