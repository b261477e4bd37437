"""Hypothesis properties of blockwise 4-bit quantization (QLoRA arXiv:2305.14314 §2-3).

Inputs are drawn as (length, block size, dtype, scale, seed) plus *features* planted on top:
constant blocks, all-zero blocks, +-0, subnormals, and values exactly on a midpoint between two
codes. Tie rule under test: a value exactly on a midpoint takes the LOWER code
(``torch.bucketize(right=False)`` in bnb ``backends/default/ops.py``; ``nearest_code`` here).
max_examples comes from the conftest profiles (dev 40; ci derandomized).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from scalellm.quant import codebook, dequantize_4bit, quantize_4bit
from scalellm.quant.blockwise import BLOCKSIZES, sort_order
from scalellm.quant.double_quant import TINY_ABSMAX, midpoints
from suites.helpers import assertions as ah

pytestmark = [pytest.mark.reference, pytest.mark.nf4, pytest.mark.fp4]

MAX_LENGTH = 100_000  # the brief: shapes from 1 element up to ~1e5
SCALE_EXPONENTS = (-30, 30)  # scales 1e-30 .. 1e30 (float32 holds up to 3.4e38)
FLOAT16_EXPONENTS = (-3, 3)  # float16 overflows above 65504 and flushes below 6e-8
# Float rounding on top of the half-gap: the scaled value is x * fl(1/absmax), <= 2 ulp (2^-22 at
# |s| <= 1) off; the decode code*absmax rounds once more (2^-24 relative); below 2^-126 the
# products are subnormal, with an absolute error up to 2^-149 each.
SCALED_SLACK = 2.0**-21
SUBNORMAL_SLACK = 2.0 * 2.0**-149


@dataclass(frozen=True)
class Case:
    x: object  # torch tensor, cpu, of ``dtype``
    quant_type: str
    blocksize: int
    dtype: str

    def __repr__(self) -> str:  # hypothesis prints it with a failing example
        return f"Case(n={self.x.numel()}, {self.quant_type}, blocksize={self.blocksize}, {self.dtype})"


def plant_midpoints(x: np.ndarray, blocksize: int, quant_type: str, rng) -> None:
    """In the first block: absmax a power of two and some values exactly on code midpoints."""
    size = min(blocksize, x.size)
    exponent = int(np.floor(np.log2(max(float(np.abs(x[:size]).max()), 2.0**-100))))
    power = np.float32(2.0**exponent)
    bounds = midpoints(codebook(quant_type)[sort_order(quant_type)])
    x[0] = power
    pick = rng.integers(0, size, size=size // 2)
    x[pick] = bounds[rng.integers(0, bounds.size, size=pick.size)] * power  # exact: times 2^k


@st.composite
def cases(draw, quant_types=("nf4", "fp4"), features=True) -> Case:
    import torch

    n = draw(st.one_of(st.integers(1, 600), st.integers(1, MAX_LENGTH)), label="n")
    blocksize = draw(st.sampled_from(BLOCKSIZES), label="blocksize")
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]), label="dtype")
    quant_type = draw(st.sampled_from(quant_types), label="quant_type")
    low, high = FLOAT16_EXPONENTS if dtype == "float16" else SCALE_EXPONENTS
    scale = 10.0 ** draw(st.integers(low, high), label="log10 scale")
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    if features:
        n_blocks = -(-n // blocksize)
        k = draw(st.integers(0, n_blocks - 1), label="featured block")
        block = slice(k * blocksize, (k + 1) * blocksize)
        if draw(st.booleans(), label="constant block"):
            x[block] = np.float32(draw(st.sampled_from([1.0, -3.5, 1e-20])) * scale)
        if draw(st.booleans(), label="zero block"):
            x[block] = 0.0
        if draw(st.booleans(), label="signed zeros"):
            x[rng.integers(0, n, size=max(1, n // 50))] = rng.choice(np.array([0.0, -0.0], np.float32))
        if draw(st.booleans(), label="subnormals"):
            x[rng.integers(0, n, size=max(1, n // 50))] = rng.integers(-9, 10, size=max(1, n // 50)) * np.float32(1e-40)
        if draw(st.booleans(), label="midpoints"):
            plant_midpoints(x, blocksize, quant_type, rng)
    return Case(torch.from_numpy(x).to(getattr(torch, dtype)), quant_type, blocksize, dtype)


def max_half_gap(quant_type: str) -> float:
    table = np.sort(codebook(quant_type).astype(np.float64))
    return float(np.diff(table).max() / 2)


def widened(x) -> np.ndarray:
    return x.float().numpy().reshape(-1)


# ---------------------------------------------------------------------------------------------


@given(case=cases())
def test_reference_equals_bnb_on_cpu(bnb, case):
    ref = quantize_4bit(case.x, case.quant_type, case.blocksize)
    got = bnb.quantize(case.x, case.quant_type, case.blocksize)
    ah.assert_floats_identical(f"absmax {case!r}", got.absmax, ref.absmax, repro=repr(case))
    ah.assert_codes_equal(f"codes {case!r}", got.codes(), ref.codes(), case.blocksize, repro=repr(case))


@given(case=cases())
def test_error_is_within_half_the_largest_code_gap(case):
    """|dequant - x| <= absmax * max half-gap of the code, for blocks bnb scales fully (absmax >= 1e-38).

    A full block whose absmax is below 1e-38 is scaled by 1/1e-38 (bnb's clamp), not 1/absmax:
    its error is only bounded by 2 * absmax (a code in [-1, 1] times absmax, and |x| <= absmax).
    """
    ref = quantize_4bit(case.x, case.quant_type, case.blocksize)
    x = widened(case.x).astype(np.float64)
    absmax = np.repeat(ref.absmax.astype(np.float64), case.blocksize)[: x.size]
    bound = np.where(absmax >= TINY_ABSMAX, absmax * (max_half_gap(case.quant_type) + SCALED_SLACK), 2 * absmax)
    ah.assert_within(f"round trip {case!r}", dequantize_4bit(ref).reshape(-1), x, bound + SUBNORMAL_SLACK,
                     case.blocksize)


@given(case=cases())
def test_requantizing_the_dequantized_values_changes_nothing(case):
    """quant(dequant(q)) decodes to dequant(q): absmax survives (the +-1 code decodes to +-absmax)
    and every decoded value sits on a code. Checked on blocks whose decoded values are normal
    floats (absmax * smallest nonzero code >= 2^-126), where ``code * absmax / absmax`` is exact
    to an ulp; FP4's two zeros (0b0000, 0b1000) may trade places, so decoded values are compared."""
    first = quantize_4bit(case.x, case.quant_type, case.blocksize)
    decoded = dequantize_4bit(first)
    second = dequantize_4bit(quantize_4bit(decoded, case.quant_type, case.blocksize))
    smallest = np.abs(codebook(case.quant_type)[codebook(case.quant_type) != 0]).min()
    normal = np.repeat(first.absmax * smallest >= 2.0**-126, case.blocksize)[: first.n]
    note(f"{np.count_nonzero(~normal)} values in blocks with subnormal decodes skipped")
    ah.assert_floats_identical(f"requantize {case!r}", second.reshape(-1)[normal], decoded.reshape(-1)[normal],
                               signed_zero=False)


@given(case=cases(features=False), shift=st.integers(-20, 20))
def test_codes_are_invariant_under_power_of_two_scaling(case, shift):
    """x -> x * 2^k leaves every code unchanged and scales absmax by 2^k (both exact in float32),
    as long as no value leaves the normal range."""
    x = widened(case.x)
    scaled = x * np.float32(2.0**shift)
    tiny = np.finfo(np.float32).tiny
    if not (np.isfinite(scaled).all() and np.all((x == 0) | (np.abs(x) >= tiny) & (np.abs(scaled) >= tiny))):
        return  # outside the normal range: the property is not claimed
    a, b = quantize_4bit(x, case.quant_type, case.blocksize), quantize_4bit(scaled, case.quant_type, case.blocksize)
    ah.assert_codes_equal(f"codes of x*2^{shift}", b.codes(), a.codes(), case.blocksize)
    ah.assert_floats_identical(f"absmax of x*2^{shift}", b.absmax, a.absmax * np.float32(2.0**shift))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_exactly_on_a_midpoint_take_the_lower_code(bnb, quant_type):
    """The tie rule, by construction: every float32 midpoint, in a block of absmax 1."""
    table = codebook(quant_type)
    order = sort_order(quant_type)
    bounds = midpoints(table[order])  # (15,)
    x = np.concatenate([[1.0], bounds, [-1.0]]).astype(np.float32)  # absmax 1: scaled == x exactly
    ref = quantize_4bit(x, quant_type, 32)
    lower = order[np.arange(bounds.size)]  # the code just below midpoint i is sorted position i
    ah.assert_codes_equal(f"{quant_type} midpoints", ref.codes()[1:-1], lower)
    import torch

    ah.assert_codes_equal(f"bnb {quant_type} midpoints", bnb.quantize(torch.from_numpy(x), quant_type, 32).codes(),
                          ref.codes())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_value_just_above_a_midpoint_takes_the_upper_code(quant_type):
    order = sort_order(quant_type)
    bounds = midpoints(codebook(quant_type)[order])
    above = np.nextafter(bounds, np.float32(np.inf))
    x = np.concatenate([[1.0], above]).astype(np.float32)
    codes = quantize_4bit(x, quant_type, 32).codes()[1:]
    ah.assert_codes_equal(f"{quant_type} just above midpoints", codes, order[np.arange(1, bounds.size + 1)])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_signed_zeros_and_all_zero_blocks(bnb, quant_type):
    """+0 and -0 quantize alike; an all-zero block has absmax 0 and decodes to zeros (bnb too)."""
    import torch

    x = np.zeros(96, np.float32)
    x[1::2] = -0.0
    ref = quantize_4bit(x, quant_type, 32)
    assert len(set(ref.codes().tolist())) == 1
    assert not ref.absmax.any() and not dequantize_4bit(ref).any()
    got = bnb.quantize(torch.from_numpy(x), quant_type, 32)
    ah.assert_codes_equal("bnb zeros", got.codes(), ref.codes())
    ah.assert_floats_identical("bnb zero absmax", got.absmax, ref.absmax)
