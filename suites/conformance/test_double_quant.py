"""Double quantization of the absmax constants (QLoRA arXiv:2305.14314 §3) against bitsandbytes.

``quantize_4bit(compress_statistics=True)`` subtracts the offset ``absmax.mean()`` (torch, float32)
and quantizes the centred constants with the signed 8-bit dynamic map in blocks of 256.
What is *defined* is asserted exactly: the offset is the float32 mean (within one ulp: torch's
reduction order), the second-level absmax given bnb's offset, the reference's codes are the true
nearest codes, and decoding given bnb's own state. bnb's native CPU 8-bit kernel is not exact
round-to-nearest (~0.16 % of codes go to the farther neighbour;
docs/evidence.md: double-quant codes by backend), so its codes are held to "within two code steps" (one is
not true: see MAX_CODE_STEPS) and the disagreement rate is recorded as a metric.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from scalellm.baselines import Tolerance
from scalellm.quant import codebook, constant_bits_per_parameter, dequantize_4bit, quantize_4bit
from scalellm.quant.blockwise import BLOCKSIZES
from scalellm.quant.double_quant import (
    DQ_BLOCKSIZE,
    TINY_ABSMAX,
    DoubleQuantState,
    absmax_mean,
    double_dequantize,
    double_quantize,
)
from suites.helpers import assertions as ah

pytestmark = [pytest.mark.reference, pytest.mark.nf4]

QUANT_TYPES = [pytest.param("nf4", marks=pytest.mark.nf4), pytest.param("fp4", marks=pytest.mark.fp4)]
DTYPES = ["float32", "float16", "bfloat16"]
# 1-D lengths: 300 constants at blocksize 64 (one full second-level block of 256 and a tail of
# 44) plus a short 4-bit tail block; each row of a 1-D tensor starts on a block (see the bnb
# dequantize bug held in test_blockwise_4bit.py).
DQ_LENGTHS = (300 * 64 + 37, 1)
DISAGREEMENT_SHAPE = (2048, 2048)  # 65,536 constants at block 64: ~100 disagreeing codes at 0.16 %
DISAGREEMENT_BLOCKSIZE = 64
# The rate is deterministic for a seeded input and one CPU code path; CI machines may take another path
# (docs/evidence.md: bnb CPU kernel paths), which lands in another device class. abs 0.0005 ~ 3 sigma of
# a binomial count of ~100 in 65,536.
DISAGREEMENT_TOLERANCE = Tolerance(abs=0.0005, why="seeded input; binomial 3 sigma at ~100 of 65,536")
# bnb's native CPU kernel picks a code 2 steps from the nearest for a few constants centred within
# ~4e-6 of absmax2 of zero, where the dynamic map's codes are ~1e-6 apart (measured here: of 65,536
# constants, 115 one step away, 2 two steps). Decoded, that is still within 2 code steps.
MAX_CODE_STEPS = 2
# The rate must stay a small minority; a kernel that truncates instead of rounding moves ~50 %.
MAX_DISAGREEMENT_SHARE = 0.01


def make_input(n_or_shape, dtype: str = "float32", seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (n_or_shape,) if isinstance(n_or_shape, int) else n_or_shape
    return (torch.randn(shape, generator=g) * 2).to(getattr(torch, dtype))


@lru_cache(maxsize=64)
def bnb_pair(bnb, quant_type: str, blocksize: int, dtype: str, n: int):
    """(input, bnb without double quant, bnb with it) for one case, on cpu."""
    x = make_input(n, dtype)
    return x, bnb.quantize(x, quant_type, blocksize), bnb.quantize(x, quant_type, blocksize, double_quant=True)


def dynamic_rank(codes: np.ndarray) -> np.ndarray:
    """The dynamic map is sorted: a code is its own rank."""
    return codes.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# memory


@pytest.mark.memory
def test_constant_bits_with_double_quant_at_block_64():
    # QLoRA §3: 8/64 + 32/(64*256) = 0.127 bit per parameter
    assert constant_bits_per_parameter(64, double_quant=True) == Fraction(8, 64) + Fraction(32, 64 * 256)


@pytest.mark.memory
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_bnb_double_quant_state_bytes_equal_the_accounted_cost(bnb, blocksize):
    for n in (1, 12321, 300 * blocksize + 5):
        _, _, got = bnb_pair(bnb, "nf4", blocksize, "float32", n)
        s = got.state
        state_bytes = (s.absmax.numel() * s.absmax.element_size()  # uint8 codes, one per block
                       + s.state2.absmax.numel() * s.state2.absmax.element_size()  # float32 per 256
                       + s.offset.numel() * s.offset.element_size())  # the float32 offset
        # (state2.code, the 256-entry map, is a shared constant, not per tensor: not counted)
        assert Fraction(8 * state_bytes) == constant_bits_per_parameter(blocksize, True, n) * n, n


# ---------------------------------------------------------------------------------------------
# what is defined: exact


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
def test_offset_is_the_float32_mean_within_one_ulp(device, bnb, blocksize):
    _, plain, nested = bnb_pair(bnb, "nf4", blocksize, "float32", DQ_LENGTHS[0])
    exact = absmax_mean(plain.absmax)
    assert abs(float(nested.offset) - float(exact)) <= float(np.spacing(exact)), (nested.offset, exact)


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("dtype", DTYPES)
def test_second_level_absmax_identical_given_bnb_offset(device, bnb, dtype):
    for blocksize in BLOCKSIZES:
        for n in DQ_LENGTHS:
            _, plain, nested = bnb_pair(bnb, "nf4", blocksize, dtype, n)
            ref = double_quantize(plain.absmax, offset=nested.offset)
            # An all-zero second-level block (one constant minus its own mean): bnb's native CPU
            # kernel stores absmax2 0, its pure-torch backend (and the reference) the clamp 1e-38.
            # Both decode to the offset; compare after the same clamp.
            ah.assert_floats_identical(f"double_quantize(blocksize={blocksize}, n={n}, {dtype}) absmax2",
                                       np.maximum(nested.absmax2, TINY_ABSMAX), ref.absmax)


def test_reference_codes_are_the_nearest_dynamic_codes():
    """Brute force over all 256 codes in float64: the reference's code is a nearest one."""
    absmax = np.abs(make_input(DISAGREEMENT_SHAPE).numpy()).reshape(-1, 64).max(axis=1)
    state = double_quantize(absmax)
    table = codebook("dynamic8").astype(np.float64)
    centred = (absmax - state.offset).astype(np.float32)
    scale = np.float32(1) / np.repeat(state.absmax, DQ_BLOCKSIZE)[: centred.size]  # full blocks: reciprocal
    tail = centred.size - centred.size % DQ_BLOCKSIZE
    scaled = (centred * scale).astype(np.float64)
    scaled[tail:] = centred[tail:] / state.absmax[-1]  # the tail block divides (bnb default backend)
    distance = np.abs(scaled[:, None] - table[None, :])  # (constants, 256)
    chosen = distance[np.arange(scaled.size), state.codes]
    ah.assert_within("double_quantize codes are nearest", chosen, distance.min(axis=1), 0.0, DQ_BLOCKSIZE)


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_identical_to_bnb_given_bnb_double_quant_state(device, bnb, quant_type, dtype):
    import torch

    for blocksize in BLOCKSIZES:
        for n in DQ_LENGTHS:
            _, _, nested = bnb_pair(bnb, quant_type, blocksize, dtype, n)
            expected = dequantize_4bit(nested.as_reference_state(dtype))
            expected = torch.from_numpy(expected).to(getattr(torch, dtype)).float().numpy()
            ah.assert_floats_identical(f"dequantize_4bit({quant_type}, {blocksize}, n={n}, {dtype}, double quant)",
                                       bnb.dequantize(nested), expected, blocksize, signed_zero=False)


@pytest.mark.devices("cpu")
def test_decoded_absmax_identical_to_bnb_given_bnb_state(device, bnb):
    _, _, nested = bnb_pair(bnb, "nf4", 64, "float32", DQ_LENGTHS[0])
    s = nested.state
    decoded = (bnb.F.dequantize_blockwise(s.absmax, s.state2) + s.offset).numpy()
    ref = double_dequantize(DoubleQuantState(nested.absmax, nested.absmax2, nested.offset))
    ah.assert_floats_identical("dequantize_blockwise + offset", decoded, ref, DQ_BLOCKSIZE)


# ---------------------------------------------------------------------------------------------
# bnb's 8-bit codes: within one code step, disagreement recorded


def code_step_bound(state: DoubleQuantState, steps: int = 1) -> np.ndarray:
    """Per constant: absmax2 times the farthest code within ``steps`` codes of the reference's
    code, plus 4 ulp for the float32 decode -> (n,) float64. A decode ``steps`` codes away from the
    nearest code stays within it."""
    table = codebook("dynamic8").astype(np.float64)
    c = state.codes.astype(np.int64)
    reach = np.maximum(np.abs(table[np.clip(c + steps, 0, 255)] - table[c]),
                       np.abs(table[c] - table[np.clip(c - steps, 0, 255)]))
    absmax2 = np.repeat(state.absmax.astype(np.float64), state.blocksize)[: c.size]
    return absmax2 * reach + 4 * np.spacing(np.float32(absmax2.max() + abs(float(state.offset))))


def test_reference_double_quant_decodes_within_one_code_step():
    x = make_input(DQ_LENGTHS[0])
    plain, nested = quantize_4bit(x, "nf4", 64), quantize_4bit(x, "nf4", 64, double_quant=True)
    ah.assert_within("decoded absmax (reference)", nested.absmax, plain.absmax,
                     code_step_bound(nested.double_quant) / 2, DQ_BLOCKSIZE)


def test_bnb_double_quant_codes_within_two_steps_of_the_nearest(device, bnb, record_metric):
    x = make_input(DISAGREEMENT_SHAPE).to(device)
    plain = bnb.quantize(x, "nf4", DISAGREEMENT_BLOCKSIZE)
    nested = bnb.quantize(x, "nf4", DISAGREEMENT_BLOCKSIZE, double_quant=True)
    ref = double_quantize(plain.absmax, offset=nested.offset)
    diff = ah.compare(nested.absmax, ref.codes, DQ_BLOCKSIZE)
    record_metric("dq_code_disagreement", diff.share, unit="1", better="lower", tolerance=DISAGREEMENT_TOLERANCE)
    steps = np.abs(dynamic_rank(nested.absmax) - dynamic_rank(ref.codes))
    assert steps.max() <= MAX_CODE_STEPS, f"a bnb code is {steps.max()} steps from the nearest: {diff.describe(256)}"
    assert diff.share <= MAX_DISAGREEMENT_SHARE, diff.describe(DQ_BLOCKSIZE)
    decoded = double_dequantize(DoubleQuantState(nested.absmax, nested.absmax2, nested.offset))
    ah.assert_within(f"{device} decoded absmax", decoded, plain.absmax, code_step_bound(ref, MAX_CODE_STEPS),
                     DQ_BLOCKSIZE)


def test_reference_offset_decodes_like_bnb_within_one_code_step(bnb):
    """The reference's own pipeline (its own offset) against bnb's decoded constants."""
    x = make_input(DQ_LENGTHS[0])
    ref = quantize_4bit(x, "nf4", 64, double_quant=True)
    _, _, nested = bnb_pair(bnb, "nf4", 64, "float32", DQ_LENGTHS[0])
    theirs = double_dequantize(DoubleQuantState(nested.absmax, nested.absmax2, nested.offset))
    ah.assert_within("decoded absmax, reference vs bnb", ref.absmax, theirs,
                     code_step_bound(ref.double_quant), DQ_BLOCKSIZE)


@pytest.mark.parametrize("seed", range(8))
def test_reference_offset_is_the_correctly_rounded_mean(seed):
    """absmax_mean is the exact mean rounded to the nearest float32 (a defined value, unlike
    torch's reduction-order mean, which bnb uses and which is held to one ulp above)."""
    absmax = np.abs(make_input(DQ_LENGTHS[0], seed=seed).numpy()).reshape(-1)[: 300 * 64].reshape(-1, 64).max(axis=1)
    exact = sum(Fraction(float(a)) for a in absmax) / absmax.size
    offset = absmax_mean(absmax)
    neighbours = np.nextafter(offset, [np.float32(-np.inf), np.float32(np.inf)])
    assert all(abs(Fraction(float(offset)) - exact) <= abs(Fraction(float(n)) - exact) for n in neighbours)


def test_double_quantize_subtracts_the_mean_offset():
    absmax = np.abs(make_input(DQ_LENGTHS[0]).numpy()[: 300 * 64]).reshape(-1, 64).max(axis=1)
    state = double_quantize(absmax)
    assert state.offset == absmax_mean(absmax)
    decoded_centred = double_dequantize(state) - state.offset
    assert abs(float(decoded_centred.mean())) < float(state.absmax.max()) / 10  # centred around 0


def test_dynamic_map_midpoints_take_the_lower_code():
    """The 8-bit tie rule (bucketize right=False, bnb default backend): with absmax2 = 1, every
    float32 midpoint of the dynamic map quantizes to the code below it."""
    from scalellm.quant.double_quant import midpoints, quantize_blockwise

    bounds = midpoints(codebook("dynamic8"))  # (255,)
    x = np.concatenate([[1.0], bounds]).astype(np.float32)  # absmax 1: scaled == x exactly
    codes, _ = quantize_blockwise(x, codebook("dynamic8"), DQ_BLOCKSIZE)
    ah.assert_codes_equal("dynamic8 midpoints", codes[1:], np.arange(255, dtype=np.uint8))
