"""Double quantization of the 4-bit absmax constants (QLoRA, arXiv:2305.14314, §3).

QLoRA stores one float32 absmax per 64 weights (0.5 bit/parameter). Double quantization subtracts
their mean (the *offset*), quantizes the centred constants with the signed 8-bit dynamic map in
blocks of 256, and keeps one float32 absmax per 256 constants: 8/64 + 32/(64*256) = 0.127
bit/parameter.

The 8-bit blockwise codec here is the *defined* one (round to the nearest code, see
:func:`nearest_code`), which is what bitsandbytes' pure-torch ``quantize_blockwise`` computes.
bnb's native CPU kernel approximates it (a few codes in a thousand go to the farther neighbour):
the conformance suite measures that instead of copying it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from scalellm.quant.codebooks import codebook

DQ_BLOCKSIZE = 256  # QLoRA §3: "we use a blocksize of 256 for the second quantization"
TINY_ABSMAX = np.float32(1e-38)  # bnb clamps an absmax to >= 1e-38 before dividing by it


@dataclass(frozen=True)
class DoubleQuantState:
    """The 8-bit encoding of a vector of absmax constants."""

    codes: np.ndarray  # (n_constants,) uint8: dynamic8 codes of (absmax - offset) / absmax2
    absmax: np.ndarray  # (ceil(n_constants / blocksize),) float32: absmax2, one per 256 constants
    offset: np.float32  # mean of the original constants, subtracted before quantizing
    blocksize: int = DQ_BLOCKSIZE  # constants per second-level block


def midpoints(sorted_code: np.ndarray) -> np.ndarray:
    """Decision boundaries between neighbouring codes -> (len-1,) float32.

    ``(code[i] + code[i+1]) / 2`` in float32, as bnb's ``_get_4bit_quantize_bounds`` and the
    default ``quantize_blockwise`` compute them.
    """
    return (sorted_code[:-1] + sorted_code[1:]) / np.float32(2.0)


def nearest_code(scaled: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index of the nearest code for each scaled value -> same shape, intp.

    Tie rule: a value exactly on a boundary takes the *lower* code. That is
    ``torch.bucketize(scaled, bounds, right=False)`` (bnb ``backends/default/ops.py``,
    ``quantize_4bit`` and ``quantize_blockwise``), i.e. the number of boundaries strictly below
    the value: ``searchsorted(side="left")``.
    """
    return np.searchsorted(bounds, scaled, side="left")


def absmax_mean(absmax: np.ndarray) -> np.float32:
    """The offset: the mean of the constants, correctly rounded to float32.

    bnb takes ``torch.mean`` in float32, whose summation order can leave the result an ulp away
    from the exact mean; the suite measures that difference.
    """
    return np.float32(math.fsum(absmax.astype(np.float64).tolist()) / absmax.size)


def quantize_blockwise(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantization to a sorted 8-bit code book.

    x: (n,) float32. Returns (codes (n,) uint8, absmax (ceil(n/blocksize),) float32).
    Must agree with bnb ``quantize_blockwise`` (default backend): full blocks are multiplied by
    the float32 reciprocal of their absmax, the tail block is *divided* by its absmax, both
    clamped to [-1, 1], then :func:`nearest_code`. An absmax below 1e-38 is raised to 1e-38
    before use; the tail block stores that raised value, full blocks their true absmax.
    """
    n = x.size
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)  # (blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    scale = np.float32(1.0) / np.maximum(absmax, TINY_ABSMAX)
    scaled = np.empty(n, dtype=np.float32)
    np.multiply(blocks, scale[:, None], out=scaled[:full].reshape(-1, blocksize))
    if full < n:
        tail_absmax = np.maximum(np.abs(x[full:]).max(), TINY_ABSMAX)
        scaled[full:] = x[full:] / tail_absmax
        absmax = np.append(absmax, tail_absmax).astype(np.float32)
    np.clip(scaled, -1.0, 1.0, out=scaled)
    codes = nearest_code(scaled, midpoints(code)).astype(np.uint8)
    return codes, absmax


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    """``code[codes] * absmax`` per block -> (n,) float32 (bnb ``dequantize_blockwise``)."""
    block_of = np.arange(codes.size) // blocksize
    return code[codes] * absmax[block_of]


def double_quantize(absmax: np.ndarray, offset: np.float32 | None = None) -> DoubleQuantState:
    """Quantize the absmax constants (n_blocks,) float32 as bnb ``quantize_4bit(compress_statistics=True)``.

    ``offset`` defaults to :func:`absmax_mean`; pass bnb's own offset to compare the remaining
    steps exactly.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    offset = absmax_mean(absmax) if offset is None else np.float32(offset)
    centred = absmax - offset  # float32, like bnb's ``_absmax - offset``
    codes, absmax2 = quantize_blockwise(centred, codebook("dynamic8"), DQ_BLOCKSIZE)
    return DoubleQuantState(codes=codes, absmax=absmax2, offset=offset)


def double_dequantize(state: DoubleQuantState) -> np.ndarray:
    """Decoded absmax constants -> (n_constants,) float32: ``dynamic8[codes] * absmax2 + offset``.

    bnb ``dequantize_4bit``: ``dequantize_blockwise(...)`` then ``absmax += offset``, both float32.
    """
    decoded = dequantize_blockwise(state.codes, state.absmax, codebook("dynamic8"), state.blocksize)
    return decoded + state.offset
