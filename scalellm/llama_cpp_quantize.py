"""llama.cpp's own quantizer, driven from Python: write float tensors to a GGUF, requantize, read back.

llama.cpp quantizes whole model files (``llama_model_quantize`` in ``src/llama-quant.cpp``, the
function behind ``llama-quantize``); there is no per-tensor entry point in its public API. So to
see the bytes llama.cpp writes for a given float tensor, :func:`quantize_tensors`:

1. writes the tensors as F32 into a GGUF with gguf-py's ``GGUFWriter``, under a minimal ``llama``
   header (:data:`TOY_HPARAMS`: the llama hyperparameters ``llama_model::load_hparams`` reads; the
   quantizer loads the architecture and hyperparameters, never the tensor list or the vocabulary, so
   any tensor names and shapes go);
2. calls ``llama_cpp.llama_model_quantize`` with ``pure = true`` ("quantize all tensors to the
   default type", llama.h) and the file type whose default tensor type is the one wanted
   (:data:`PURE_FILE_TYPE`, ``llama_ftype_get_default_type``);
3. reads the output back with :func:`scalellm.gguf_file.open_gguf` (gguf-py's ``GGUFReader``).

Which tensors llama.cpp quantizes (``tensor_allows_quantization``, ``llama_tensor_get_type``):
only tensors of 2 or more dimensions whose name ends in ``weight`` and does not contain
``_norm.weight``; the rest are copied as they are. A row length that is not a multiple of the
type's block falls back (``tensor_type_fallback``): Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0 (:data:`FALLBACK`). Without an importance matrix every legacy and K-quant type is
produced by ggml's ``quantize_row_*_ref`` (``ggml-quants.c``: ``quantize_q4_K`` & co. call the
``_ref`` function when ``quant_weights`` is NULL), the functions ``scalellm.quant.gguf`` mirrors.

:func:`requantize_file` runs the same call on a real model file (its per-tensor type mixture, e.g.
``Q4_K_M``, unless ``pure``), and :func:`bits_per_weight` reports the result's size as
llama-quantize does (``quant size ... BPW``: tensor bytes x 8 / elements).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalellm.gguf_file import numpy_shape, open_gguf

ARCH = "llama"
#: A small but consistent llama header for ``llama_model::load_hparams`` (context, embedding, block
#: count, feed-forward, heads, RMS epsilon); measured: llama_model_quantize accepts it with tensors
#: of any name and shape.
TOY_HPARAMS = {
    "context_length": 512,
    "embedding_length": 256,
    "block_count": 1,
    "feed_forward_length": 1024,
    "attention.head_count": 4,
    "attention.head_count_kv": 4,
}
TOY_RMS_EPS = 1e-5

#: Block type -> the llama.cpp file type (``LLAMA_FTYPE_MOSTLY_<name>``) whose default tensor type
#: it is (``llama_ftype_get_default_type``): with ``pure`` every quantizable tensor takes it.
PURE_FILE_TYPE = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
    "F16": "F16",
}
#: ``tensor_type_fallback``: the type a tensor takes when its row length is not a multiple of 256.
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


class QuantizeError(RuntimeError):
    """``llama_model_quantize`` returned non-zero (its reason is in llama.cpp's log on stderr)."""


def file_type(name: str) -> int:
    """``LLAMA_FTYPE_MOSTLY_<name>`` (e.g. ``"Q4_K_M"``, ``"F16"``) as llama-cpp-python defines it."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        raise ValueError(f"llama.cpp has no file type {name!r} (no llama_cpp.LLAMA_FTYPE_MOSTLY_{name.upper()})")
    return int(value)


def write_f32_gguf(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> Path:
    """Write ``tensors`` (numpy shapes, row-major) as F32 under a minimal llama header."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(path, ARCH)
    for key, value in TOY_HPARAMS.items():
        writer.add_uint32(f"{ARCH}.{key}", value)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", TOY_RMS_EPS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, x in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def requantize_file(src: str | os.PathLike, dst: str | os.PathLike, ftype_name: str, *, pure: bool = False,
                    allow_requantize: bool = True, nthread: int = 0) -> Path:
    """``llama_model_quantize(src, dst, params)`` with ``llama_model_quantize_default_params()``,
    the file type ``ftype_name`` (``"Q4_K_M"``, ``"Q8_0"``, ...), ``pure`` and ``allow_requantize``
    (an already quantized tensor is dequantized to f32 first: ``llama_tensor_dequantize_impl``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(ftype_name)
    params.pure = pure
    params.allow_requantize = allow_requantize
    params.nthread = nthread
    dst = Path(dst)
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), params)
    if rc != 0 or not dst.is_file():
        raise QuantizeError(f"llama_model_quantize({src} -> {dst}, {ftype_name}) returned {rc}")
    return dst


@dataclass(frozen=True)
class Tensor:
    """One tensor as read back from a GGUF."""

    type_name: str  # ggml type, e.g. "Q4_K"
    shape: tuple[int, ...]  # numpy order
    raw: np.ndarray  # uint8 (rows, row bytes) for quantized types; the values for F32/F16

    @property
    def n_bytes(self) -> int:
        return int(self.raw.nbytes)


def read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Every tensor of a GGUF (through ``open_gguf``), copied out of the file's memory map."""
    reader = open_gguf(path)
    return {t.name: Tensor(t.tensor_type.name, numpy_shape(t), np.array(t.data)) for t in reader.tensors}


def quantize_tensors(tensors: dict[str, np.ndarray], type_name: str, workdir: str | os.PathLike) -> dict[str, Tensor]:
    """The bytes llama.cpp's quantizer writes for ``tensors`` as ``type_name`` (pure file type).

    Tensors llama.cpp does not quantize come back as F32; rows it cannot block come back in the
    :data:`FALLBACK` type. Files are written under ``workdir``.
    """
    if type_name not in PURE_FILE_TYPE:
        raise ValueError(f"no pure llama.cpp file type for {type_name!r}; known: {', '.join(PURE_FILE_TYPE)}")
    workdir = Path(workdir)
    src = write_f32_gguf(workdir / "f32.gguf", tensors)
    dst = requantize_file(src, workdir / f"{type_name}.gguf", PURE_FILE_TYPE[type_name], pure=True)
    return read_tensors(dst)


def bits_per_weight(path_or_reader) -> float:
    """Tensor-data bytes x 8 / elements over every tensor of a file (llama-quantize's "BPW"); takes a
    path or a ``GGUFReader`` already open (parsing a model's vocabulary takes seconds)."""
    reader = path_or_reader if hasattr(path_or_reader, "tensors") else open_gguf(path_or_reader)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_elements = sum(int(t.n_elements) for t in reader.tensors)
    return 8 * n_bytes / n_elements


__all__ = ["FALLBACK", "PURE_FILE_TYPE", "QuantizeError", "Tensor", "bits_per_weight", "file_type",
           "quantize_tensors", "read_tensors", "requantize_file", "write_f32_gguf"]
