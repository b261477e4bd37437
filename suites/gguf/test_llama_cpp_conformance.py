"""llama.cpp's own quantizer against the numpy reference (``scalellm.quant.gguf``), byte for byte.

The same float32 tensors are written to an F32 GGUF with ``gguf.GGUFWriter``, quantized by
``llama_cpp.llama_model_quantize`` (pure file type per block type, see
:mod:`scalellm.llama_cpp_quantize`), read back with ``gguf.GGUFReader`` and compared with
``scalellm.quant.gguf.quantize`` of the same floats. Without an importance matrix llama.cpp
quantizes with ggml's ``quantize_row_*_ref`` (``ggml-quants.c``: ``quantize_q4_K`` & co. call
the ``_ref`` function when ``quant_weights`` is NULL), which is what the reference mirrors.

Tensors: seeded N(0, 1) and weight-like data (rows of 1024: four super-blocks), the real model's
ffn_down of three layers (rows of 1536 = 6 super-blocks) and its layer-0 attn_q (rows of 576:
the legacy types take it, the K-quants fall back to a 32-block type, ``tensor_type_fallback``).
Plus what llama.cpp leaves alone: a 1-D tensor, a 2-D ``*_norm.weight`` and a 2-D tensor whose
name does not end in ``weight`` come back as F32, bit for bit.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from scalellm import llama_cpp_quantize as lq
from scalellm.quant import gguf as ref
from suites.helpers.gguf_cases import ALL_TYPES, K_QUANTS, normal_rows, weight_like_rows
from suites.helpers import assertions as ah

pytestmark = [pytest.mark.gguf, pytest.mark.reference]

SYNTHETIC_SHAPE = (64, 1024)  # as test_block_formats.CONFORMANCE_SHAPE: rows a multiple of 256
SYNTHETIC = {"normal.weight": normal_rows, "weight_like.weight": weight_like_rows}
REAL = ("blk.0.ffn_down.weight", "blk.15.ffn_down.weight", "blk.29.ffn_down.weight", "blk.0.attn_q.weight")
QUANTIZED = (*SYNTHETIC, *REAL)
# What llama.cpp must copy as it is (tensor_allows_quantization): fewer than 2 dimensions; a name
# containing "_norm.weight"; a name not ending in "weight".
LEFT_ALONE_SHAPES = {"blk.0.attn_norm.weight": (256,), "blk.0.ffn_norm.weight": (4, 256), "blk.0.attn_q.bias": (4, 256)}


@pytest.fixture(scope="module")
def inputs(real_tensors) -> dict[str, np.ndarray]:
    """The float32 tensors written to the F32 file, by GGUF name (the real ones dequantized from Q4_1)."""
    out = {name: make(SYNTHETIC_SHAPE) for name, make in SYNTHETIC.items()}
    for name in REAL:
        qtype, shape, raw = real_tensors[name]
        out[name] = ref.dequantize(raw, qtype, shape)
    for i, (name, shape) in enumerate(LEFT_ALONE_SHAPES.items()):
        out[name] = normal_rows(shape, seed=100 + i)
    return out


@pytest.fixture(scope="module")
def llama_cpp_quantized(llama_cpp_py, inputs, tmp_path_factory):
    """``quantized(type) -> {name: Tensor}``: llama.cpp's output for ``inputs``, once per type."""

    @cache
    def quantized(type_name: str):
        return lq.quantize_tensors(inputs, type_name, tmp_path_factory.mktemp(f"llama_cpp_{type_name}"))

    return quantized


def expected_type(type_name: str, row_length: int) -> str:
    """The type llama.cpp gives a row of this length (``tensor_type_fallback``)."""
    if row_length % ref.block_size(type_name):
        return lq.FALLBACK[type_name]
    return type_name


def types(names):
    return [pytest.param(t, id=t) for t in names]


@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_llama_cpp_picks_the_requested_type_or_its_fallback(llama_cpp_quantized, inputs, qtype):
    """Every quantizable tensor takes the pure file type's type; rows of 576 under a K-quant take the
    fallback type (docs/evidence.md: K-quants and SmolLM2); the rest stay F32."""
    got = {name: t.type_name for name, t in llama_cpp_quantized(qtype).items()}
    want = {name: expected_type(qtype, inputs[name].shape[-1]) for name in QUANTIZED}
    want |= {name: "F32" for name in LEFT_ALONE_SHAPES}
    assert got == want
    if qtype in K_QUANTS:
        assert got["blk.0.attn_q.weight"] == lq.FALLBACK[qtype]


def test_tensors_llama_cpp_leaves_alone_come_back_unchanged(llama_cpp_quantized, inputs):
    out = llama_cpp_quantized("Q4_0")
    for name in LEFT_ALONE_SHAPES:
        assert out[name].shape == inputs[name].shape
        np.testing.assert_array_equal(out[name].raw.view(np.uint32), inputs[name].view(np.uint32), err_msg=name)


@pytest.mark.parametrize("name", QUANTIZED)
@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_llama_cpp_bytes_identical_to_reference(llama_cpp_quantized, inputs, qtype, name):
    """llama.cpp's blocks equal ``scalellm.quant.gguf.quantize`` of the same floats, byte for byte."""
    x = inputs[name]
    tensor = llama_cpp_quantized(qtype)[name]
    want = expected_type(qtype, x.shape[-1])
    assert tensor.type_name == want and tensor.shape == x.shape
    theirs = tensor.raw.reshape(x.shape[0], -1)
    ah.assert_blocks_identical(f"llama_model_quantize({name}{x.shape}, {want})", ref.quantize(x, want), theirs,
                            ref.type_size(want))


def test_q4_1_weights_come_back_as_the_shipped_bytes(llama_cpp_quantized, real_tensors):
    """The real tensors sit on a Q4_1 grid: llama.cpp requantizing their floats gives the file's bytes."""
    out = llama_cpp_quantized("Q4_1")
    for name in REAL:
        np.testing.assert_array_equal(out[name].raw, real_tensors[name][2], err_msg=name)
