"""The named assertion helpers (suites/helpers/assertions.py): they pass on equal input and fail
with the diagnostics they promise (count, worst block, share of differing bits, repro)."""

from __future__ import annotations

import numpy as np
import pytest

from suites.helpers import assertions as ah


def test_compare_counts_worst_block_and_bits():
    expected = np.zeros(12, np.uint8)
    actual = expected.copy()
    actual[[1, 5, 6, 7]] = [1, 3, 1, 15]  # block 1 (of 4) holds three; 1+2+1+4 = 8 differing bits
    diff = ah.compare(actual, expected, 4, bits=4)
    assert (diff.count, diff.total, diff.worst_block, diff.worst_block_count, diff.first) == (4, 12, 1, 3, 1)
    assert diff.bit_share == 8 / (4 * 12)


def test_equal_codes_pass():
    codes = np.arange(16, dtype=np.uint8)
    ah.assert_codes_equal("op", codes, codes.copy(), 4)


def test_differing_codes_fail_with_diagnostics():
    expected = np.zeros(8, np.uint8)
    actual = expected.copy()
    actual[6] = 2
    with pytest.raises(AssertionError) as info:
        ah.assert_codes_equal("quantize_4bit(nf4)", actual, expected, 4, repro="make_input((8,))")
    message = str(info.value)
    assert message.startswith("quantize_4bit(nf4): codes differ: 1 of 8 differ (12.5000%)")
    assert "worst block 1 (of 4) holds 1" in message and "3.1250% of bits differ" in message
    assert "index 6: actual code 2, expected 0" in message and "repro: make_input((8,))" in message


def test_floats_compare_bits_nan_and_signed_zero():
    a = np.array([np.nan, 0.0, 1.0], np.float32)
    ah.assert_floats_identical("op", a, a.copy())  # NaN matches NaN
    b = np.array([np.nan, -0.0, 1.0], np.float32)
    with pytest.raises(AssertionError, match="1 of 3 differ"):
        ah.assert_floats_identical("op", b, a)
    ah.assert_floats_identical("op", b, a, signed_zero=False)


def test_one_ulp_is_a_difference_and_reports_max_delta():
    a = np.ones(4, np.float32)
    b = a.copy()
    b[2] = np.nextafter(np.float32(1), np.float32(2))
    with pytest.raises(AssertionError, match=r"max \|delta\| 1\.19209e-07"):
        ah.assert_floats_identical("op", b, a)


def test_within_bound_passes_and_beyond_fails_naming_the_worst():
    ah.assert_within("op", [1.0, 2.0], [1.1, 2.0], 0.1 + 1e-12)
    with pytest.raises(AssertionError, match=r"worst excess .* at index 1"):
        ah.assert_within("op", [1.0, 2.5, 2.0], [1.0, 2.0, 2.1], [0.0, 0.1, 0.2])


def wrong_shape(values: np.ndarray) -> np.ndarray:
    """A planted op: the right values, returned as a row (what bnb 0.50.2's CPU dequantize_4bit does
    to an even-length 1-D input)."""
    return values.reshape(1, -1)


@pytest.mark.parametrize("check", [
    lambda a, e: ah.assert_codes_equal("op", a.astype(np.uint8), e.astype(np.uint8)),
    lambda a, e: ah.assert_floats_identical("op", a, e),
    lambda a, e: ah.assert_within("op", a, e, 0.0),
], ids=["codes", "floats", "within"])
def test_right_values_in_the_wrong_shape_fail_naming_both_shapes(check):
    expected = np.arange(6, dtype=np.float32)
    with pytest.raises(AssertionError, match=r"^op: shape \(1, 6\), expected \(6,\)$"):
        check(wrong_shape(expected), expected)


def test_identical_values_in_another_dtype_fail_naming_both_dtypes():
    expected = np.arange(4, dtype=np.float32)
    with pytest.raises(AssertionError, match=r"^op: dtype float16, expected float32$"):
        ah.assert_floats_identical("op", expected.astype(np.float16), expected)


def test_layout_names_every_difference():
    torch = pytest.importorskip("torch")
    out = torch.zeros(1, 6, dtype=torch.float32)
    ah.assert_layout("op", out, shape=(1, 6), dtype=torch.float32, device="cpu")
    ah.assert_layout("op", out.numpy(), shape=(1, 6), dtype="float32")
    with pytest.raises(AssertionError, match=r"^op: shape \(1, 6\), expected \(6,\); dtype float32, expected "
                                             r"bfloat16; device cpu, expected cuda$"):
        ah.assert_layout("op", out, shape=(6,), dtype=torch.bfloat16, device="cuda")


def test_helpers_hide_their_frames(pytester):
    pytester.makepyfile(test_hidden="""
        import numpy as np
        from suites.helpers import assertions as ah

        def test_fails():
            ah.assert_codes_equal("op", np.ones(2, np.uint8), np.zeros(2, np.uint8))
    """)
    from pathlib import Path

    pytester.syspathinsert(str(Path(__file__).resolve().parents[2]))
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "def assert_codes_equal" not in result.stdout.str()
    assert "def _fail" not in result.stdout.str()
