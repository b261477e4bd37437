"""The three code books of 4-bit QLoRA storage, derived from their definitions (never pasted).

- ``nf4``: NormalFloat4, QLoRA (Dettmers et al. 2023, arXiv:2305.14314) §3 and Appendix E.
- ``fp4``: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), in code order.
- ``dynamic8``: the signed 8-bit dynamic tree map (Dettmers 2016, arXiv:1511.04561) that
  bitsandbytes' ``create_dynamic_map(signed=True)`` builds and QLoRA's double quantization
  uses for the absmax constants.

Every value is a float32, computed with the same float32 steps as the bitsandbytes
construction so that the results are bit-identical to bnb's tables
(``bitsandbytes.functional.get_4bit_type`` and ``create_dynamic_map``).
"""

from __future__ import annotations

from functools import lru_cache
from statistics import NormalDist

import numpy as np

NF4_OFFSET = 0.9677083  # QLoRA Appendix E: the outermost quantile, (1 - 1/(2*15) + 1 - 1/(2*16)) / 2
FP4_SUBNORMAL_STEP = 2.0**-4  # magnitude of code 0b001 before normalisation (bnb's dDequantizeFP4Tree)
DYNAMIC_EXPONENT_BITS = 7  # create_dynamic_map(max_exponent_bits=7): decades 1e-6 .. 1e0
NAMES = ("nf4", "fp4", "dynamic8")


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` (float32, CPU) reproduced bit for bit -> (steps,) float32.

    torch's CPU kernel (aten RangeFactoriesKernel ``linspace_kernel``) takes a float32 ``step``,
    fills the first half as ``start + step*i`` and the second half as ``end - step*(steps-1-i)``,
    each a fused multiply-add: rounded to float32 once. A float64 product of a float32 and a small
    integer, plus a float32, is exact, so one rounding of that float64 is the FMA.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32(end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(start32) + np.float64(step) * i
    second = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def normal_float4(offset: float = NF4_OFFSET) -> np.ndarray:
    """NF4 code book -> (16,) float32, sorted, code ``i`` is entry ``i``.

    QLoRA §3: estimate the 2^k + 1 quantiles of N(0, 1) asymmetrically so that zero is exact:
    8 positive quantiles on ``linspace(offset, 0.5, 9)[:-1]``, 7 negative ones on
    ``linspace(offset, 0.5, 8)[:-1]``, plus 0, then normalise into [-1, 1] by the largest value.
    Same steps as ``bitsandbytes.functional.create_normal_map`` (quantile grid in float32, values
    rounded to float32 before the division), with Python's ``NormalDist.inv_cdf`` for scipy's ppf.
    """
    probit = NormalDist().inv_cdf
    positive = [probit(float(p)) for p in torch_linspace_f32(offset, 0.5, 9)[:-1]]
    negative = [-probit(float(p)) for p in torch_linspace_f32(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(positive + [0.0] + negative, dtype=np.float32))
    return values / values.max()  # float32 division, like bnb's ``values /= values.max()``


def fp4_value(code: int) -> float:
    """Magnitude-and-sign of one FP4 code before normalisation (bnb's bit layout).

    Bits ``s e1 e0 m``: sign ``s`` (0b1000); exponent field ``e``; mantissa ``m``.
    Normal codes (e = 1, 2, 3) are ``(1 + m/2) * 2^(4 - e)``: the exponent field counts *down*
    (0b010 = 8, 0b100 = 4, 0b110 = 2). The subnormal codes (e = 0) are ``m * 2^-4``: 0 and 0.0625.
    Source: bitsandbytes ``get_4bit_type("fp4")`` and the CUDA ``dDequantizeFP4Tree``
    (``create_fp8_map(True, 2, 1, 4)``, which bnb's comment names, gives 1/48 there, not 1/192).
    """
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:
        # Zero is unsigned: bnb lists code 0b1000 as the Python int ``-0``, i.e. +0.0.
        return sign * FP4_SUBNORMAL_STEP if mantissa else 0.0
    return sign * (1.0 + mantissa / 2.0) * 2.0 ** (4 - exponent)


def fp4() -> np.ndarray:
    """FP4 code book -> (16,) float32 in *code order* (entry ``i`` decodes code ``i``; not sorted).

    Normalised by the largest magnitude (12) in float32, like ``get_4bit_type``'s
    ``data.div_(data.abs().max())``. Codes 0b0000 and 0b1000 both decode to +0.0.
    """
    values = np.array([fp4_value(code) for code in range(16)], dtype=np.float32)
    return values / np.abs(values).max()


def dynamic_map(max_exponent_bits: int = DYNAMIC_EXPONENT_BITS) -> np.ndarray:
    """Signed 8-bit dynamic map -> (256,) float32, sorted.

    For each decade ``i`` (scale 10^(i - 6)), 2^i fraction steps: the midpoints of
    ``linspace(0.1, 1, 2^i + 1)`` (float32) times the decade, with both signs; then 0 and +1.
    1 + 2 + ... + 64 = 127 magnitudes, 254 signed values, 256 in all (the map has +1 but no -1).
    Same float32 steps as ``bitsandbytes.functional.create_dynamic_map(signed=True)``: the
    midpoint mean and the decade product are float32 operations.
    """
    values = [np.float32(0.0), np.float32(1.0)]
    for i in range(max_exponent_bits):
        bounds = torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        decade = np.float32(10.0 ** (i - (max_exponent_bits - 1))) * means
        values.extend(decade)
        values.extend(-decade)
    assert len(values) == 256, len(values)
    return np.sort(np.array(values, dtype=np.float32))


@lru_cache(maxsize=None)
def _build(name: str) -> np.ndarray:
    builders = {"nf4": normal_float4, "fp4": fp4, "dynamic8": dynamic_map}
    if name not in builders:
        raise ValueError(f"unknown code book {name!r}; choose one of {NAMES}")
    table = builders[name]()
    table.flags.writeable = False
    return table


def codebook(name: str) -> np.ndarray:
    """The code book ``name`` ("nf4", "fp4" or "dynamic8") as a read-only float32 array.

    nf4 and dynamic8 are sorted; fp4 is in code order (see :func:`fp4`).
    """
    return _build(name)
