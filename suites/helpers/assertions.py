"""Named assertions for codec conformance: a failure says *how much* differs, not just "not equal".

Each helper takes the name of the operation first (``"quantize_4bit(nf4, 64)"``), hides its own
frame from tracebacks (``__tracebackhide__``) and, on failure, reports the diagnostics gguf-py's
verifier prints: the count and share of differing elements, the worst block (the one holding the
most differences) and the share of differing bits. An optional ``repro`` string (a line of code
that rebuilds the input) is appended to the message.

Shape (and, for bit-identity, dtype) are checked before values and never flattened away: an op that
returns the right values in the wrong shape fails with both shapes named. A caller that means to
compare flat values flattens both sides itself, where the reader sees it. :func:`assert_layout`
holds a library's returned tensor to the shape, dtype and device it must have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from suites.helpers.bounds import DEVICE_CODE_MISMATCH_MAX

__all__ = [
    "Difference",
    "assert_blocks_identical",
    "assert_codes_equal",
    "assert_layout",
    "assert_floats_identical",
    "assert_int8_codes_agree",
    "assert_within",
    "compare",
]


@dataclass(frozen=True)
class Difference:
    """How two equally long arrays differ."""

    count: int  # elements that differ
    total: int  # elements compared
    worst_block: int  # index of the block with the most differing elements (-1 when none differ)
    worst_block_count: int  # differing elements in that block
    bit_share: float  # differing bits / all bits compared
    first: int  # flat index of the first difference (-1 when none differ)

    @property
    def share(self) -> float:
        return self.count / self.total if self.total else 0.0

    def describe(self, blocksize: int | None) -> str:
        where = f"block {self.worst_block} (of {blocksize})" if blocksize else f"block {self.worst_block}"
        return (f"{self.count} of {self.total} differ ({self.share:.4%}); worst {where} holds "
                f"{self.worst_block_count}; {self.bit_share:.4%} of bits differ; first at index {self.first}")


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of ``a`` as unsigned integers of the same width -> (n,)."""
    a = np.ascontiguousarray(a).reshape(-1)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _same_shape(op: str, actual: np.ndarray, expected: np.ndarray) -> None:
    __tracebackhide__ = True
    if np.shape(actual) != np.shape(expected):
        raise AssertionError(f"{op}: shape {np.shape(actual)}, expected {np.shape(expected)}")


def compare(actual: np.ndarray, expected: np.ndarray, blocksize: int | None = None, *,
            bits: int | None = None, same: np.ndarray | None = None) -> Difference:
    """Diagnostics of ``actual`` vs ``expected`` (same shape; blocks and indices counted in C order).

    ``bits``: significant bits per element (4 for nibble codes; default: the item width).
    ``same``: a precomputed boolean "these elements agree" mask of that shape (default: equal bit patterns).
    """
    _same_shape("compare", actual, expected)
    a, e = np.asarray(actual).reshape(-1), np.asarray(expected).reshape(-1)
    xor = _bits(a) ^ _bits(e.astype(a.dtype, copy=False))
    diff = ~same.reshape(-1) if same is not None else xor != 0
    width = bits or 8 * a.dtype.itemsize
    n_bits = int(np.unpackbits(xor.view(np.uint8)).sum()) if diff.any() else 0
    per_block = np.add.reduceat(diff.astype(np.int64), np.arange(0, diff.size, blocksize or diff.size or 1)) if diff.size else diff
    worst = int(per_block.argmax()) if diff.any() else -1
    return Difference(count=int(diff.sum()), total=int(diff.size), worst_block=worst,
                      worst_block_count=int(per_block[worst]) if worst >= 0 else 0,
                      bit_share=n_bits / (width * max(diff.size, 1)),
                      first=int(np.flatnonzero(diff)[0]) if diff.any() else -1)


def _fail(op: str, what: str, diff: Difference, blocksize: int | None, repro: str, extra: str = "") -> None:
    __tracebackhide__ = True
    message = f"{op}: {what} differ: {diff.describe(blocksize)}{extra}"
    if repro:
        message += f"\nrepro: {repro}"
    raise AssertionError(message)


def assert_codes_equal(op: str, actual: np.ndarray, expected: np.ndarray, blocksize: int | None = None, *,
                       repro: str = "") -> None:
    """Two arrays of 4-bit codes (uint8 values < 16, one code per element) of one shape are identical."""
    __tracebackhide__ = True
    _same_shape(op, actual, expected)
    diff = compare(np.asarray(actual, np.uint8), np.asarray(expected, np.uint8), blocksize, bits=4)
    if diff.count:
        i = diff.first
        extra = f" (index {i}: actual code {int(np.ravel(actual)[i])}, expected {int(np.ravel(expected)[i])})"
        _fail(op, "codes", diff, blocksize, repro, extra)


def assert_floats_identical(op: str, actual: np.ndarray, expected: np.ndarray, blocksize: int | None = None, *,
                            signed_zero: bool = True, repro: str = "") -> None:
    """Two float arrays of one shape and dtype are bit-identical (NaN matches NaN).
    ``signed_zero=False`` lets -0.0 match +0.0."""
    __tracebackhide__ = True
    _same_shape(op, actual, expected)
    a, e = np.asarray(actual).reshape(-1), np.asarray(expected).reshape(-1)
    if a.dtype != e.dtype:
        raise AssertionError(f"{op}: dtype {a.dtype}, expected {e.dtype}")
    same = _bits(a) == _bits(e)
    if same is not None and not signed_zero:
        same |= (a == 0) & (e == 0)
    diff = compare(a, e, blocksize, same=same)
    if diff.count:
        both = np.isfinite(a) & np.isfinite(e)
        worst = float(np.max(np.abs(a[both].astype(np.float64) - e[both]), initial=0.0))
        i = diff.first
        extra = f"; max |delta| {worst:.6g} (index {i}: actual {a[i]!r}, expected {e[i]!r})"
        _fail(op, "values", diff, blocksize, repro, extra)


def assert_within(op: str, actual: np.ndarray, expected: np.ndarray, bound, blocksize: int | None = None, *,
                  repro: str = "") -> None:
    """``|actual - expected| <= bound`` elementwise, for arrays of one shape (``bound`` a scalar or an
    array of that shape)."""
    __tracebackhide__ = True
    _same_shape(op, actual, expected)
    a = np.asarray(actual, np.float64).reshape(-1)
    e = np.asarray(expected, np.float64).reshape(-1)
    b = np.broadcast_to(np.asarray(bound, np.float64).reshape(-1) if np.ndim(bound) else bound, a.shape)
    excess = np.abs(a - e) - b
    ok = excess <= 0
    if not ok.all():
        diff = compare(a, e, blocksize, same=ok)
        i = int(np.argmax(np.where(ok, -np.inf, excess)))
        extra = (f"; worst excess {excess[i]:.6g} at index {i}: |{a[i]!r} - {e[i]!r}| > bound {b[i]!r}")
        _fail(op, "values beyond the bound", diff, blocksize, repro, extra)


def assert_layout(op: str, actual, *, shape: tuple[int, ...], dtype, device: str | None = None) -> None:
    """A returned array or tensor has ``shape``, ``dtype`` (a torch or numpy dtype, or its name) and,
    for a tensor, lives on ``device`` (its type: ``"cpu"``, ``"cuda"``...) -- checked before any value."""
    __tracebackhide__ = True
    found = []
    if tuple(actual.shape) != tuple(shape):
        found.append(f"shape {tuple(actual.shape)}, expected {tuple(shape)}")
    name = str(actual.dtype).removeprefix("torch.")
    if name != str(dtype).removeprefix("torch."):
        found.append(f"dtype {name}, expected {str(dtype).removeprefix('torch.')}")
    where = getattr(getattr(actual, "device", None), "type", "cpu")
    if device is not None and where != device.split(":")[0]:
        found.append(f"device {where}, expected {device}")
    if found:
        raise AssertionError(f"{op}: " + "; ".join(found))


def assert_int8_codes_agree(op: str, device: str, ref: np.ndarray, lib: np.ndarray) -> float:
    """LLM.int8 codes: bit-identical on cpu; on other devices at most ``DEVICE_CODE_MISMATCH_MAX``
    (``suites/helpers/bounds.py`` says why) differ, each by one step. Returns the share that differs."""
    __tracebackhide__ = True
    diff = compare(lib, ref, ref.shape[-1])
    if device == "cpu" and diff.count:
        raise AssertionError(f"{op}: codes differ on cpu: {diff.describe(ref.shape[-1])}")
    assert diff.share <= DEVICE_CODE_MISMATCH_MAX, f"{op}: {diff.describe(ref.shape[-1])}"
    step = int(np.abs(lib.astype(np.int16) - ref).max())
    assert step <= 1, f"{op}: a code differs by {step} steps"
    return diff.share


def assert_blocks_identical(op: str, ours: np.ndarray, theirs: np.ndarray, type_size: int) -> None:
    """Raw blocks identical; on failure: how many blocks and bytes differ, the worst block, the bits."""
    __tracebackhide__ = True
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape, (
        f"{op}: got {ours.dtype}{ours.shape}, expected {theirs.dtype}{theirs.shape}")
    diff = compare(ours, theirs, type_size)
    if diff.count:
        bad = (ours.reshape(-1, type_size) != theirs.reshape(-1, type_size)).any(axis=1)
        b = diff.worst_block
        raise AssertionError(
            f"{op}: {int(bad.sum())} of {bad.size} blocks differ; bytes: {diff.describe(type_size)}\n"
            f"worst block {b}: ours {ours.reshape(-1, type_size)[b].tolist()}\n"
            f"{' ' * (len(str(b)) + 13)}theirs {theirs.reshape(-1, type_size)[b].tolist()}")
