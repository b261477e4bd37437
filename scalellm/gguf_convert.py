"""Write a dense Hugging Face Llama checkpoint (safetensors + config.json) as a GGUF in F32 or F16.

The steps follow llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaForCausalLM`` (class
``LlamaModel``), each function naming the one it mirrors:

* **metadata** (:func:`llama_metadata`): ``TextModel.set_gguf_parameters`` (block count, context,
  embedding and feed-forward lengths, head counts, rope base, RMS epsilon, key/value length,
  file type) plus ``LlamaModel.set_gguf_parameters`` (vocab size, rope dimension count), and
  ``prepare_metadata``'s ``general.type`` / ``general.name`` / ``general.quantization_version``;
* **tensor names** (:func:`gguf_name`): ``ModelBase.map_tensor_name`` through gguf-py's
  ``TensorNameMap`` (``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``); a tied
  ``lm_head`` is not written, so the file has no ``output.weight`` (llama.cpp then reuses
  ``token_embd``, as in the shipped SmolLM2 file);
* **rope permutation** (:func:`permute_for_rope`): ``LlamaModel.permute`` on the rows of q and k
  (transformers' ``LlamaTensorProcessor._reverse_permute_weights`` undoes it on load);
* **tensor types** (:func:`tensor_type`): ``ModelBase.prepare_tensors``: 1-D tensors and
  ``*_norm.weight`` stay F32; the rest take the file's type;
* **tokenizer** (:func:`copy_tokenizer`): copied, key by key with its GGUF value types, from the
  GGUF the checkpoint was converted from (see its docstring for why that is faithful).

A checkpoint that is not a Llama, or holds a NaN or infinite weight, is refused with a
:class:`ConversionError` naming the file (and the tensor). The output is written to a temporary
name beside ``out_path`` and renamed, so a failed conversion never leaves a partial ``.gguf``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Output types this converter writes, and their ``general.file_type`` (gguf-py ``LlamaFileType``).
FILE_TYPES = {"F32": 0, "F16": 1}  # ALL_F32, MOSTLY_F16
ARCH = "llama"
#: What config.json must say to be converted here (convert_hf_to_gguf registers LlamaModel for it).
LLAMA_ARCHITECTURE = "LlamaForCausalLM"
#: Only plain rope is converted: scaled variants need llama.cpp's extra rope keys or tensors.
PLAIN_ROPE = ("default", None)
TOKENIZER_PREFIX = "tokenizer."  # tokenizer.ggml.* and tokenizer.chat_template


class ConversionError(ValueError):
    """A checkpoint this converter refuses: ``ConversionError(path, problem)``; the message starts
    with the file at fault."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: cannot convert to GGUF: {problem}")


@dataclass(frozen=True)
class LlamaParams:
    """The hyperparameters a llama GGUF needs, read from config.json."""

    n_blocks: int  # num_hidden_layers
    n_ctx: int  # max_position_embeddings
    n_embd: int  # hidden_size
    n_ff: int  # intermediate_size
    n_head: int  # num_attention_heads
    n_head_kv: int  # num_key_value_heads (== n_head without GQA)
    head_dim: int  # head_dim, else hidden_size // num_attention_heads
    rope_theta: float  # rope_theta (transformers 4) or rope_parameters.rope_theta (transformers 5)
    rms_eps: float  # rms_norm_eps
    vocab_size: int
    tied: bool  # tie_word_embeddings: lm_head is token_embd
    name: str  # general.name: config's _model_name_or_path, else the directory's name


@dataclass(frozen=True)
class Converted:
    path: Path
    out_type: str  # "F32" or "F16"
    n_tensors: int
    n_bytes: int  # size of the written file
    seconds: float


def _rope_theta(config: dict) -> float | None:
    """rope_theta where transformers 4 (top level) or 5 (``rope_parameters``) keeps it."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return config.get("rope_theta", rope.get("rope_theta"))


def read_llama_params(checkpoint: str | os.PathLike) -> LlamaParams:
    """config.json of ``checkpoint`` -> :class:`LlamaParams`; ConversionError naming config.json if
    it is not a plain-rope ``LlamaForCausalLM``."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ConversionError(path, "no config.json: not a Hugging Face checkpoint directory")
    config = json.loads(path.read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if config.get("model_type") != ARCH or LLAMA_ARCHITECTURE not in archs:
        raise ConversionError(path, f"model_type {config.get('model_type')!r}, architectures {archs}: only "
                                    f"{LLAMA_ARCHITECTURE} (model_type 'llama') is converted")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in PLAIN_ROPE:
        raise ConversionError(path, f"rope type {rope_type!r} is not converted (only plain rope)")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(path, f"hidden_act {config['hidden_act']!r}: llama.cpp's llama graph uses silu")
    try:
        n_head = int(config["num_attention_heads"])
        return LlamaParams(
            n_blocks=int(config["num_hidden_layers"]), n_ctx=int(config["max_position_embeddings"]),
            n_embd=int(config["hidden_size"]), n_ff=int(config["intermediate_size"]), n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // n_head),
            rope_theta=float(_rope_theta(config) or 10000.0), rms_eps=float(config["rms_norm_eps"]),
            vocab_size=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
            name=str(config.get("_model_name_or_path") or Path(checkpoint).resolve().name))
    except KeyError as exc:
        raise ConversionError(path, f"missing key {exc.args[0]!r}") from None


def llama_metadata(writer, hp: LlamaParams, out_type: str) -> None:
    """Architecture keys, as ``TextModel.set_gguf_parameters`` + ``LlamaModel.set_gguf_parameters``
    and ``ModelBase.prepare_metadata`` write them for a llama."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(hp.name)
    writer.add_block_count(hp.n_blocks)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_file_type(FILE_TYPES[out_type])
    writer.add_vocab_size(hp.vocab_size)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def copy_tokenizer(writer, source_gguf: str | os.PathLike, vocab_size: int) -> int:
    """Copy every ``tokenizer.*`` key of ``source_gguf`` (value and GGUF value types); return how many.

    Why copying is faithful here: the fp32 checkpoint was made by transformers from that very GGUF
    (``scalellm.models.convert_gguf``), and its ``tokenizer.json`` was built by transformers' GGUF
    tokenizer converter from these same ``tokenizer.ggml.*`` keys. They are therefore the source
    the checkpoint's tokenizer came from, not a copy of it; rebuilding them from ``tokenizer.json``
    the way ``convert_hf_to_gguf``'s ``set_vocab`` does would need its table of pre-tokenizer
    hashes to name ``tokenizer.ggml.pre``, and could only reproduce what is copied here.
    (``suites/gguf/test_conversion.py`` checks the copied vocabulary against the checkpoint's
    tokenizer, id by id.)
    """
    source = Path(source_gguf).resolve()
    stat = source.stat() if source.is_file() else None
    fields = _tokenizer_fields(source, stat and (stat.st_size, stat.st_mtime_ns))
    n_tokens = next((len(value) for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"), None)
    if n_tokens is None:
        raise ConversionError(source, "has no tokenizer.ggml.tokens to copy")
    if n_tokens != vocab_size:
        raise ConversionError(source, f"vocabulary of {n_tokens} tokens, but the checkpoint's vocab_size is "
                                      f"{vocab_size}")
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    return len(fields)


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(source: Path, identity) -> tuple:
    """``(key, value, value type, element type or None)`` of every ``tokenizer.*`` key of ``source``.

    Cached per (path, size and mtime in ``identity``): gguf-py parses the 98,000 strings of a
    49k-token BPE vocabulary in about 4 s, and a session converts from the same file several times.
    """
    from scalellm.gguf_file import open_gguf

    reader = open_gguf(source)  # GGUFFileError naming the file if it is missing or damaged
    return tuple((key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
                 for key, f in reader.fields.items() if key.startswith(TOKENIZER_PREFIX))


def permute_for_rope(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's interleaved pairs
    (``LlamaModel.permute`` of convert_hf_to_gguf.py): within each head, rows
    ``[0..d/2) and [d/2..d)`` become pairs ``(0, d/2), (1, d/2+1), ...``. For k, the heads are the
    key/value heads. ``w`` is ``(heads * head_dim, ...)``; the result has its shape."""
    if n_head_kv is not None and n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name_map, hf_name: str, file: Path) -> str:
    """``ModelBase.map_tensor_name``: the llama.cpp name of an HF tensor (ConversionError if none)."""
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConversionError(file, f"tensor {hf_name!r} has no llama.cpp name (not a llama tensor)")
    return new


def tensor_type(gguf_tensor_name: str, ndim: int, out_type: str) -> type[np.floating]:
    """``ModelBase.prepare_tensors``: 1-D tensors and norms stay F32 ("most of the codebase that takes
    in 1D tensors or norms only handles F32 tensors"); the rest take the file's type."""
    if out_type not in FILE_TYPES:
        raise ValueError(f"out_type must be one of {sorted(FILE_TYPES)}, not {out_type!r}")
    if ndim <= 1 or gguf_tensor_name.endswith("_norm.weight") or out_type == "F32":
        return np.float32
    return np.float16


def _checked(file: Path, name: str, x: np.ndarray) -> np.ndarray:
    """``x`` if every value is finite; a ConversionError naming the file and tensor otherwise."""
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ConversionError(file, f"tensor {name!r} has {int(bad.sum())} NaN/inf values "
                                    f"(first at index {first}, value {x[first]})")
    return x


def checkpoint_tensors(checkpoint: str | os.PathLike):
    """Yield ``(safetensors file, HF name, float32 numpy array)`` over every ``*.safetensors`` file in
    name order (``ModelBase.get_tensors``; other dtypes become float32 as ``prepare_tensors`` does)."""
    import torch
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise ConversionError(Path(checkpoint), "no *.safetensors file in the checkpoint directory")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield file, name, f.get_tensor(name).to(torch.float32).numpy()


def gguf_tensors(checkpoint: str | os.PathLike, hp: LlamaParams, out_type: str):
    """Yield ``(llama.cpp name, array in its GGUF dtype)``: LlamaModel.modify_tensors + prepare_tensors."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_blocks)
    for file, name, x in checkpoint_tensors(checkpoint):
        if name.endswith(".rotary_emb.inv_freq") or (hp.tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same tensor as token_embd
        x = _checked(file, name, x)
        new = gguf_name(name_map, name, file)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            x = permute_for_rope(x, hp.n_head, hp.n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            x = permute_for_rope(x, hp.n_head, hp.n_head_kv)
        dtype = tensor_type(new, x.ndim, out_type)
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            y = x.astype(dtype, copy=False)
        if dtype is np.float16 and not np.isfinite(y).all():
            raise ConversionError(file, f"tensor {name!r} has values beyond float16's range (max "
                                        f"{np.abs(x).max():.6g}); write F32 instead")
        yield new, np.ascontiguousarray(y)


def convert(checkpoint: str | os.PathLike, out_path: str | os.PathLike, out_type: str = "F32", *,
            tokenizer_from: str | os.PathLike) -> Converted:
    """Write ``checkpoint`` (an HF Llama directory) to ``out_path`` as a GGUF of ``out_type``.

    ``tokenizer_from`` is the GGUF whose ``tokenizer.*`` keys are copied (:func:`copy_tokenizer`):
    for a checkpoint made by ``scalellm.models.convert_gguf``, the GGUF it came from.
    """
    import gguf

    if out_type not in FILE_TYPES:
        raise ValueError(f"out_type must be one of {sorted(FILE_TYPES)}, not {out_type!r}")
    start = time.perf_counter()
    hp = read_llama_params(checkpoint)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(None, ARCH)
    try:
        llama_metadata(writer, hp, out_type)
        copy_tokenizer(writer, tokenizer_from, hp.vocab_size)
        n = 0
        for name, array in gguf_tensors(checkpoint, hp, out_type):
            writer.add_tensor(name, array)
            n += 1
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return Converted(out_path, out_type, n, out_path.stat().st_size, time.perf_counter() - start)


__all__ = ["ConversionError", "Converted", "FILE_TYPES", "LlamaParams", "convert", "copy_tokenizer",
           "gguf_tensors", "llama_metadata", "permute_for_rope", "read_llama_params", "tensor_type"]
