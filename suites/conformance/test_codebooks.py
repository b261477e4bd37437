"""The code books: bit-identical to bitsandbytes' tables, and true to their definitions.

NF4: QLoRA (arXiv:2305.14314) §3 and Appendix E. FP4: bnb's 1-2-1 float. dynamic8: the signed
dynamic tree map (arXiv:1511.04561) that double quantization uses.
"""

from __future__ import annotations

import numpy as np
import pytest

from scalellm.quant import codebook
from scalellm.quant.codebooks import NF4_OFFSET, torch_linspace_f32
from suites.helpers import assertions as ah
from suites.helpers.packages import need

pytestmark = [pytest.mark.reference]

NF4 = pytest.param("nf4", marks=pytest.mark.nf4)
FP4 = pytest.param("fp4", marks=pytest.mark.fp4)
QLORA_APPENDIX_E_OFFSET = 0.9677083  # QLoRA App. E: "offset = 0.9677083" (printed to 7 decimals)
FP4_MAGNITUDES = (0, 0.0625, 2, 3, 4, 6, 8, 12)  # bnb's FP4 magnitudes before /12 (dDequantizeFP4Tree)


def bnb_table(bnb, name: str) -> np.ndarray:
    F = bnb.F
    if name == "dynamic8":
        return F.create_dynamic_map(signed=True).numpy()
    return F.get_4bit_type(name, device="cpu").numpy()


@pytest.mark.parametrize("name", [NF4, FP4, pytest.param("dynamic8", marks=pytest.mark.nf4)])
def test_codebook_is_bit_identical_to_bnb(bnb, name):
    ah.assert_floats_identical(f"codebook({name!r}) vs bnb", codebook(name), bnb_table(bnb, name))


@pytest.mark.nf4
def test_nf4_construction_matches_bnb_create_normal_map(bnb):
    need("scipy")  # create_normal_map calls scipy.stats.norm.ppf
    ah.assert_floats_identical("codebook('nf4') vs create_normal_map()", codebook("nf4"),
                               bnb.F.create_normal_map().numpy())


def test_torch_linspace_reproduction_is_bit_exact():
    import torch

    for start, end, steps in [(NF4_OFFSET, 0.5, 9), (NF4_OFFSET, 0.5, 8), (0.1, 1.0, 65), (0.1, 1.0, 2)]:
        ah.assert_floats_identical(f"torch_linspace_f32{(start, end, steps)}", torch_linspace_f32(start, end, steps),
                                   torch.linspace(start, end, steps).numpy())


@pytest.mark.parametrize("name", ["nf4", "fp4", "dynamic8"])
def test_codebooks_are_read_only_float32(name):
    table = codebook(name)
    assert table.dtype == np.float32
    with pytest.raises(ValueError):
        table[0] = 0.5


def test_unknown_codebook_is_a_value_error():
    with pytest.raises(ValueError, match="unknown code book 'nf3'"):
        codebook("nf3")


@pytest.mark.nf4
class TestNF4Definition:
    """QLoRA §3: 2^4 values, exact zero, asymmetric halves, normalised into [-1, 1]."""

    def test_sixteen_sorted_distinct_values(self):
        table = codebook("nf4")
        assert table.size == 16
        assert np.all(np.diff(table) > 0)

    def test_zero_is_exact(self):
        assert np.count_nonzero(codebook("nf4") == 0.0) == 1

    def test_eight_positive_seven_negative(self):
        table = codebook("nf4")
        assert (np.count_nonzero(table > 0), np.count_nonzero(table < 0)) == (8, 7)

    def test_extremes_are_plus_and_minus_one(self):
        table = codebook("nf4")
        assert (table.min(), table.max()) == (-1.0, 1.0)

    def test_offset_is_qlora_appendix_e(self):
        # QLoRA App. E: the offset averages the outermost quantile positions of the two halves.
        assert NF4_OFFSET == QLORA_APPENDIX_E_OFFSET
        assert abs((1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2 - NF4_OFFSET) < 5e-8

    def test_values_are_normal_quantiles(self):
        from statistics import NormalDist

        table = codebook("nf4").astype(np.float64)
        scale = NormalDist().inv_cdf(NF4_OFFSET)  # the largest quantile, which normalisation maps to 1
        positive = [NormalDist().inv_cdf(p) / scale for p in np.linspace(NF4_OFFSET, 0.5, 9)[:-1]]
        np.testing.assert_allclose(table[8:][::-1], positive, rtol=1e-6)  # float32 construction: ~1 ulp


@pytest.mark.fp4
class TestFP4Definition:
    def test_code_order_is_sign_then_magnitude(self):
        table = codebook("fp4").astype(np.float64)
        np.testing.assert_array_equal(table[8:], -table[:8])  # 0b1xxx is the negative of 0bxxxx

    def test_magnitudes(self):
        magnitudes = sorted(np.abs(codebook("fp4")[:8]).astype(np.float64) * 12)
        np.testing.assert_allclose(magnitudes, FP4_MAGNITUDES, rtol=1e-7)


@pytest.mark.nf4
class TestDynamicMapDefinition:
    def test_256_sorted_values_with_zero_and_one(self):
        table = codebook("dynamic8")
        assert table.size == 256
        assert np.all(np.diff(table) > 0)
        assert table[-1] == 1.0 and 0.0 in table

    def test_symmetric_except_plus_one(self):
        table = codebook("dynamic8")
        inner = table[(table != 0) & (table != 1)]
        np.testing.assert_array_equal(np.sort(-inner), inner)
