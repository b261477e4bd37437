"""Blockwise 4-bit quantization (NF4 and FP4) as QLoRA (arXiv:2305.14314, §2-3) and bitsandbytes define it.

A tensor is flattened and cut into blocks of ``blocksize`` values (the last block may be short).
Each block is scaled into [-1, 1] by its absolute maximum (the *absmax*, one float32 constant per
block), each scaled value is replaced by the index of its nearest code in the 16-entry code book,
and two 4-bit indices are packed per byte. Dequantization is ``code[index] * absmax``.

The numbers follow bitsandbytes 0.50 bit for bit: ``bitsandbytes.functional.quantize_4bit`` /
``dequantize_4bit`` (CPU: ``backends/default/ops.py``; CUDA kernels are measured, not copied).
Everything is vectorised over blocks; there is no Python loop over the data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np

from scalellm.quant.codebooks import codebook
from scalellm.quant.double_quant import (
    DQ_BLOCKSIZE,
    TINY_ABSMAX,
    DoubleQuantState,
    double_dequantize,
    double_quantize,
    midpoints,
    nearest_code,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb quantize_4bit's accepted block sizes
QUANT_TYPES = ("nf4", "fp4")
DTYPES = ("float32", "float16", "bfloat16")  # input dtypes bnb accepts for 4-bit quantization


@dataclass(frozen=True)
class QuantState4bit:
    """A 4-bit quantized tensor; enough to dequantize it."""

    packed: np.ndarray  # (ceil(n/2),) uint8: code of value 2i in the high nibble, 2i+1 in the low
    absmax: np.ndarray  # (n_blocks,) float32: per-block absmax (the decoded one under double quant)
    quant_type: str  # "nf4" or "fp4"
    blocksize: int  # values per block, one of BLOCKSIZES
    shape: tuple[int, ...]  # shape of the input tensor
    dtype: str  # input dtype: "float32", "float16" or "bfloat16"
    double_quant: DoubleQuantState | None = None  # the 8-bit absmax encoding, when double quantized

    @property
    def n(self) -> int:
        """Number of quantized values."""
        return int(np.prod(self.shape, dtype=np.int64))

    def codes(self) -> np.ndarray:
        """The 4-bit code of each value -> (n,) uint8 (unpacks :attr:`packed`)."""
        return unpack_nibbles(self.packed)[: self.n]


def constant_bits_per_parameter(blocksize: int = 64, double_quant: bool = False, n: int | None = None) -> Fraction:
    """Exact storage cost of the quantization constants, in bits per parameter.

    With ``n=None`` the asymptotic figure of QLoRA §3: ``32/blocksize`` without double quant
    (0.5 at block 64), ``8/blocksize + 32/(blocksize*256)`` with it (0.126953125 ~ 0.127).
    With ``n``: the exact cost for a tensor of ``n`` values, counting the short tail blocks and,
    under double quant, the float32 offset, as bnb stores them.
    """
    if n is None:
        if double_quant:
            return Fraction(8, blocksize) + Fraction(32, blocksize * DQ_BLOCKSIZE)
        return Fraction(32, blocksize)
    n_blocks = -(-n // blocksize)
    if not double_quant:
        return Fraction(32 * n_blocks, n)
    n_blocks2 = -(-n_blocks // DQ_BLOCKSIZE)
    return Fraction(8 * n_blocks + 32 * n_blocks2 + 32, n)


# --------------------------------------------------------------------------------------------
# input handling


def as_float32(x) -> tuple[np.ndarray, tuple[int, ...], str]:
    """A torch tensor or numpy array -> (flat float32 values (n,), shape, dtype name).

    float16 widens exactly; bfloat16 is the top half of a float32, so it is widened exactly by
    shifting its bits (no rounding anywhere).
    """
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        dtype = str(x.dtype).removeprefix("torch.")
        t = x.detach().cpu().contiguous()
        if dtype == "bfloat16":
            import torch

            bits = t.view(torch.int16).numpy().view(np.uint16)
            arr = (bits.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = t.numpy()
    else:
        arr = np.asarray(x)
        dtype = arr.dtype.name
        if dtype == "bfloat16":  # ml_dtypes' numpy bfloat16
            arr = (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype not in DTYPES:
        raise ValueError(f"4-bit quantization takes {', '.join(DTYPES)} input, got {dtype}")
    shape = tuple(arr.shape)
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot quantize an empty tensor")
    return flat, shape, dtype


def check_finite(x: np.ndarray, absmax: np.ndarray, blocksize: int) -> None:
    """Raise ValueError naming the first NaN or inf; ``absmax`` (a max over each block) is NaN or
    inf exactly where a block holds one, so only the first bad block is searched."""
    bad_blocks = np.flatnonzero(~np.isfinite(absmax))
    if bad_blocks.size == 0:
        return
    start = int(bad_blocks[0]) * blocksize
    block = x[start : start + blocksize]
    nan = np.flatnonzero(np.isnan(block))
    if nan.size:
        raise ValueError(f"cannot quantize NaN (first at flat index {start + int(nan[0])})")
    inf = np.flatnonzero(np.isinf(block))
    raise ValueError(f"cannot quantize inf (first at flat index {start + int(inf[0])}: {block[inf[0]]})")


# --------------------------------------------------------------------------------------------
# code books in sorted order, and a fast exact nearest-code lookup


@lru_cache(maxsize=None)
def sort_order(quant_type: str) -> np.ndarray:
    """Code indices in ascending order of value -> (16,) uint8.

    NF4 is already sorted. FP4 holds zero twice (codes 0b0000 and 0b1000): like bnb's
    ``torch.argsort`` on CPU (``_get_4bit_quantize_bounds``) the sort is stable, so code 0 comes
    first. Consequence (bucketize, tie to the lower bucket): scaled 0 and tiny negatives
    [-1/384, 0] get code 0b0000, tiny positives (0, 1/384] get 0b1000.
    """
    order = np.argsort(codebook(quant_type), kind="stable").astype(np.uint8)
    order.flags.writeable = False
    return order


HIGH_HALF = 1 if sys.byteorder == "little" else 0  # which uint16 of a float32 holds its top bits
HAS_BOUNDARY = np.uint8(0x80)  # flag bit in the key table: this key's interval holds a code boundary


@lru_cache(maxsize=None)
def key_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over the top 16 bits of a float32 -> (below, threshold, above), each (65536,).

    The floats sharing their top 16 bits form one interval [a, b] (2^16 consecutive floats, at
    most 1/256 wide within [-1, 1], far narrower near the boundaries close to 0); it holds at
    most one boundary of the code book (asserted). For every x in it the nearest code is
    ``above`` if ``x > threshold`` else ``below`` (the code of a), which is :func:`nearest_code`
    exactly, tie rule included, and already mapped to bnb's code order. Keys whose interval holds
    no boundary need no comparison; ``below`` carries :data:`HAS_BOUNDARY` on the others.
    Values beyond +-1 get the end codes, which is what clamping to [-1, 1] does.
    """
    order = sort_order(quant_type)
    bounds = midpoints(codebook(quant_type)[order])
    keys = np.arange(1 << 16, dtype=np.uint32) << 16
    lo, hi = keys.view(np.float32), (keys | 0xFFFF).view(np.float32)
    a, b = np.minimum(lo, hi), np.maximum(lo, hi)  # interval ends (negative keys run backwards)
    finite = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(finite, a, 0), np.where(finite, b, 0)  # NaN/inf keys: rejected before lookup
    below = np.searchsorted(bounds, a, side="left")  # sorted position of a's code
    inside = np.searchsorted(bounds, b, side="right") - below
    assert inside.max() <= 1, "a key interval holds two code boundaries"
    threshold = np.where(inside == 1, bounds[np.minimum(below, bounds.size - 1)], np.inf).astype(np.float32)
    above = order[np.minimum(below + 1, 15)]
    below = order[below] | np.where(inside == 1, HAS_BOUNDARY, 0).astype(np.uint8)
    for table in (below, threshold, above):
        table.flags.writeable = False
    return below, threshold, above


def nearest_code_fast(scaled: np.ndarray, quant_type: str) -> np.ndarray:
    """bnb's code of each scaled value -> (n,) uint8; :func:`nearest_code` + :func:`sort_order`, via
    :func:`key_tables` (one table read per value, a comparison for the ~1% near a boundary)."""
    below, threshold, above = key_tables(quant_type)
    key = scaled.view(np.uint16)[HIGH_HALF::2]  # top 16 bits of each float32
    codes = below.take(key)
    near = np.flatnonzero(codes >= HAS_BOUNDARY)
    k = key[near]
    codes[near] = np.where(scaled[near] > threshold[k], above[k], codes[near] & ~HAS_BOUNDARY)
    return codes


# --------------------------------------------------------------------------------------------
# nibble packing


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(2m,) uint8 codes < 16 -> (m,) uint8.

    The first value of each pair goes in the HIGH nibble: bnb ``quantize_4bit`` (default backend)
    ``packed = (q8[::2] << 4) | q8[1::2]``, and CUDA ``kQuantizeBlockwise``
    ``(q0 << 4) | q1``.
    """
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """(m,) uint8 -> (2m,) uint8 codes, inverse of :func:`pack_nibbles`."""
    codes = np.empty(2 * packed.size, dtype=np.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes


# --------------------------------------------------------------------------------------------
# the codec


def block_absmax(x: np.ndarray, blocksize: int) -> np.ndarray:
    """Per-block max |x| -> (n_blocks,) float32; the short tail block is raised to >= 1e-38.

    bnb ``quantize_4bit`` returns full blocks' absmax as is (0 for an all-zero block) and the tail
    block's absmax after ``clamp(min=1e-38)``.
    """
    n = x.size
    full = n - n % blocksize
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)
    if full:
        np.abs(x[:full].reshape(-1, blocksize)).max(axis=1, out=absmax[: full // blocksize])
        absmax[: full // blocksize] += np.float32(0.0)  # -0.0 -> +0.0, as torch's abs().max() gives
    if full < n:
        absmax[-1] = max(np.abs(x[full:]).max(), TINY_ABSMAX)
    return absmax


def scale_blocks(x: np.ndarray, absmax: np.ndarray, blocksize: int) -> np.ndarray:
    """Scale each block into [-1, 1] (before clamping) -> (n + n % 2,) float32, odd n padded with 0.

    Full blocks: ``x * (1 / max(absmax, 1e-38))``, a float32 reciprocal then a product;
    the tail block: ``x / absmax``, a true division (bnb ``quantize_4bit``, default backend).
    The two differ in the last bit for some values, so the order of operations is part of the format.
    """
    n = x.size
    full = n - n % blocksize
    scaled = np.empty(n + n % 2, dtype=np.float32)
    if full:
        reciprocal = np.float32(1.0) / np.maximum(absmax[: full // blocksize], TINY_ABSMAX)
        np.multiply(x[:full].reshape(-1, blocksize), reciprocal[:, None], out=scaled[:full].reshape(-1, blocksize))
    if full < n:
        np.divide(x[full:], absmax[-1], out=scaled[full:n])
    scaled[n:] = 0.0  # bnb pads an odd count with one scaled 0 (the low nibble of the last byte)
    return scaled


def quantize_4bit(x, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False) -> QuantState4bit:
    """Quantize ``x`` (any shape; float32, float16 or bfloat16; torch or numpy) to 4 bits.

    Steps, each agreeing with bnb ``quantize_4bit`` (CPU default backend):
      1. flatten, widen to float32 exactly;                              x: (n,)
      2. absmax per block of ``blocksize`` (:func:`block_absmax`);        (n_blocks,)
      3. scale into [-1, 1] (:func:`scale_blocks`; reciprocal, tail divides);
      4. nearest code, ties to the lower code (:func:`nearest_code`), FP4 mapped from sorted
         position back to its bit pattern (:func:`sort_order`);         (n,) uint8
      5. pack two codes per byte, first in the high nibble;             (ceil(n/2),) uint8
      6. with ``double_quant``, encode the absmax with :func:`double_quantize`; the state's
         ``absmax`` then holds the decoded constants that dequantization uses.
    Raises ValueError for NaN or inf, an unknown ``quant_type``, ``blocksize`` or dtype.
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    flat, shape, dtype = as_float32(x)
    absmax = block_absmax(flat, blocksize)
    check_finite(flat, absmax, blocksize)
    scaled = scale_blocks(flat, absmax, blocksize)
    packed = pack_nibbles(nearest_code_fast(scaled, quant_type))
    dq = None
    if double_quant:
        dq = double_quantize(absmax)
        absmax = double_dequantize(dq)
    return QuantState4bit(packed, absmax, quant_type, blocksize, shape, dtype, dq)


def dequantize_4bit(state: QuantState4bit) -> np.ndarray:
    """``code[index] * absmax`` per block -> float32 array of ``state.shape``.

    bnb ``dequantize_4bit`` (``_dequantize_4bit_compute`` / the C++ CPU kernels): one float32
    product per value, the tail block with its own absmax. bnb then casts to the input dtype;
    this returns float32, which rounds (to nearest even) to bnb's output.
    """
    table = codebook(state.quant_type)
    pairs = np.stack([table[np.arange(256) >> 4], table[np.arange(256) & 0x0F]], axis=1)  # (256, 2)
    values = pairs.take(state.packed, axis=0).reshape(-1)[: state.n]  # (n,) float32
    n, bs = state.n, state.blocksize
    full = n - n % bs
    values[:full].reshape(-1, bs)[...] *= state.absmax[: full // bs, None]
    if full < n:
        values[full:] *= state.absmax[-1]
    return values.reshape(state.shape)
