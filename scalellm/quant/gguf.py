"""GGUF block formats: a numpy reference for ggml's block quantizers and dequantizers.

GGUF stores a tensor row as a run of fixed-size *blocks*: ``block_size`` weights become
``type_size`` bytes (a few fp16 scales and packed integer codes). This module mirrors the C
reference of each format in ggml (``ggml/src/ggml-quants.c`` in llama.cpp): the ``*_ref``
quantizers, which ggml keeps "for deterministic creation of model files", and the
``dequantize_row_*`` functions. The K-quants (super-blocks of 256 with 6- or 8-bit sub-block
scales) are ggml's own design, introduced in llama.cpp PR #1684 (I. Kawrakow, 2023); the format
itself is described in the GGUF spec (``ggml/docs/gguf.md``).

Formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32) and Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (blocks
of 256), each able to quantize and dequantize. Each is one small class below that declares its
block as a numpy structured dtype (the C struct, field for field) and writes only "quantize these
blocks" and "dequantize these blocks"; :class:`BlockFormat` reshapes, checks and registers.

Public API::

    quantize(x, "Q4_0")              -> uint8, shape (*x.shape[:-1], x.shape[-1] // 32 * 18)
    dequantize(raw, "Q4_0", shape)   -> float32 of `shape`
    block_size(t), type_size(t), bits_per_weight(t), formats()
    records(raw, "Q4_0")             -> the blocks as numpy records of the C struct (fields d, qs, ...)

Exactness. The results are meant to be bit-identical to ggml's reference, so every float step
is done in float32 in ggml's order, and three C idioms are reproduced rather than approximated:

* ``roundf`` (Q8_0) rounds halves away from zero; ``np.rint`` rounds them to even, and the
  textbook ``floor(x + 0.5)`` is wrong for 0.49999997 (the sum rounds up to 1.0 in float32).
* ``nearest_int`` (K-quants) adds the magic number 1.5 * 2**23 and reads the low mantissa bits:
  ties go to even, and out of range (|x| > 2**22, e.g. a division by a tiny sub-block scale) it
  returns garbage rather than saturating. We do the same float32 addition and bit read.
* ggml sums left to right in float32 (``for (...) sum += ...``); numpy's ``sum`` is pairwise,
  which changes the last bits and, through ``cur_error < best_error`` comparisons, the chosen
  codes. :func:`_seqsum` sums sequentially.

Fragile points of the reference itself (where two honest implementations may differ):

* fp16 scales: ``GGML_FP32_TO_FP16`` rounds to nearest even, as ``astype(np.float16)`` does;
  scales that are fp16-subnormal lose precision and scales above 65504 become inf.
* ggml is compiled without ``-ffp-contract=off``; where the compiler fuses ``a*b + c`` into an FMA
  (e.g. aarch64 builds) the K-quant searches can pick other codes. The reference here never fuses.
* Signed zeros (the only places where gguf-py's numpy quantizer and ggml write other bytes):
  - Q4_0, Q5_0: ggml's "first absmax" starts from ``+0.0``, so an all-zero block (zeros of any
    sign) stores ``d = +0/-8 = -0.0`` (bytes ``00 80``); gguf-py divides ``x[0]`` instead, so
    it stores ``+0.0`` (``00 00``) exactly when the block is all zero and ``x[0]`` is ``-0.0``.
  - Q4_1, Q5_1: ggml's ``if (v < min) min = v`` keeps the *first* zero when the minimum of a
    block is zero; gguf-py's ``np.min`` returns a zero of unspecified sign, so ``m`` (bytes 2-3)
    may differ in its sign bit when a block whose minimum is zero holds zeros of both signs.
  Either way the decoded values are equal (as floats; zeros may differ in sign). We follow ggml.
* Ties in "first maximum" searches keep the first index (ggml's strict ``>``); so does argmax.

Invalid input (NaN or inf, a row length that is not a multiple of the block, a byte count that
does not match the shape, an unknown type) raises :class:`ValueError` naming the problem.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

QK_K = 256  # weights per K-quant super-block (ggml's QK_K)
GROUP_MAX_EPS = np.float32(1e-15)  # ggml: a group whose absmax is below this is "all zero"

_F32 = np.float32
_FORMATS: dict[str, type[BlockFormat]] = {}


# ---------------------------------------------------------------- C idioms, vectorised


def _fp16(v) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even (subnormals kept, overflow -> inf)."""
    return np.asarray(v, dtype=_F32).astype(np.float16)


def _f32(h) -> np.ndarray:
    """GGML_FP16_TO_FP32 (exact)."""
    return np.asarray(h).astype(_F32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C ``roundf``: nearest integer, halves away from zero. ``v - trunc(v)`` is exact."""
    t = np.trunc(v)
    step = np.where(np.abs(v - t) >= _F32(0.5), np.sign(v), _F32(0)).astype(_F32)
    return t + step


def _nearest_int(v) -> np.ndarray:
    """ggml ``nearest_int``: ``fval + 12582912.f`` (1.5 * 2**23) then the low 23 bits as an int.

    The float32 addition rounds ties to even; outside |fval| <= 4194303 the result is garbage in
    C (only an assert guards it) and identical garbage here.
    """
    bits = (np.asarray(v, dtype=_F32) + _F32(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis left to right in float32, as ggml's ``sum += ...`` loops do."""
    return np.cumsum(a, axis=-1, dtype=_F32)[..., -1]


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """The signed value of largest magnitude per row; the first one on ties, +0.0 if none.

    Mirrors ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` starting from ``max = 0.0f``.
    """
    ax = np.abs(x)
    v = np.take_along_axis(x, ax.argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return np.where(ax.max(axis=-1) > 0, v, _F32(0)).astype(_F32)


def _first_min(x: np.ndarray) -> np.ndarray:
    """``if (v < min) min = v`` from FLT_MAX: the first minimum (matters only for signed zeros)."""
    return np.take_along_axis(x, x.argmin(axis=-1)[..., None], axis=-1)[..., 0]


def _first_max(x: np.ndarray) -> np.ndarray:
    return np.take_along_axis(x, x.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f`` (note ``-0.0`` counts as zero)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)


def _as_u8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to ``uint8_t``: modulo 256."""
    return (np.asarray(v) & 0xFF).astype(np.uint8)


def _as_i8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to ``int8_t`` (two's complement wrap)."""
    return _as_u8(v).view(np.int8)


# ---------------------------------------------------------------- ggml's scale searches


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` for rows of ``x``.

    Symmetric codes in [-nmax, nmax-1]; weights x**2; tries 19 candidate inverse scales
    ``-(nmax + 0.1*is)/max`` and keeps the one maximising ``sumlx**2 / suml2``.
    x: (rows, n) float32 -> (scale (rows,), L (rows, n) in [0, 2*nmax) as int32).
    """
    mx = _first_absmax(x)  # (rows,)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x

    def codes(iscale):
        l = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(_F32)
        return l, _seqsum(w * x * lf), _seqsum(w * lf * lf)  # sumlx, suml2 in ggml's order

    with np.errstate(divide="ignore", invalid="ignore"):
        l, sumlx, suml2 = codes(_F32(-nmax) / mx)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
        best = scale * sumlx
        L = l + nmax
        for step in range(-9, 10):
            if step == 0:
                continue
            # iscale = -(nmax + 0.1f*is)/max: float32 steps, in this order
            l, sumlx, suml2 = codes(-(_F32(nmax) + _F32(0.1) * _F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale).astype(_F32)
            best = np.where(better, scale * sumlx, best).astype(_F32)
    return np.where(zero, _F32(0), scale).astype(_F32), np.where(zero[:, None], 0, L)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for rows of ``x``.

    Codes in [-nmax, nmax-1], then up to 5 passes of coordinate descent on the weighted
    (x**2) least-squares fit; each pass walks the elements in order, so it is sequential within a
    row and vectorised across rows. x: (rows, n) -> (scale (rows,), L (rows, n) in [0, 2*nmax)).
    """
    rows, n = x.shape
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.clip(_nearest_int((_F32(-nmax) / mx)[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(_F32)
        sumlx = _seqsum(wx * Lf)
        suml2 = _seqsum(w * Lf * Lf)
        active = ~zero
        for _ in range(5):
            changed = np.zeros(rows, dtype=bool)
            for i in range(n):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(_F32)
                slx = sumlx - wx[:, i] * li
                sl2 = suml2 - wi * li * li
                new = np.clip(_nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new.astype(_F32)
                slx_new = slx + wx[:, i] * nf
                sl2_new = sl2 + wi * nf * nf
                take = (active & (slx > 0) & (new != L[:, i]) & (sl2_new > 0)
                        & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new))
                L[:, i] = np.where(take, new, L[:, i])
                sumlx = np.where(take, slx_new, sumlx).astype(_F32)
                suml2 = np.where(take, sl2_new, suml2).astype(_F32)
                changed |= take
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0)).astype(_F32)
    return np.where(zero, _F32(0), scale).astype(_F32), np.where(zero[:, None], 0, L + nmax)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml ``make_qkx2_quants``: affine codes ``x ~ scale*L - the_min``, L in [0, nmax].

    Grid search over ``nstep + 1`` inverse scales ``(rmin + rdelta*is + nmax)/(max - min)``, each
    followed by a weighted least-squares refit of (scale, min); keeps the lowest weighted error
    (squared, or absolute if ``use_mad``). As in C, ``min`` is updated inside the search, so later
    candidates are measured from the best fit so far.
    x, w: (rows, n) -> (scale (rows,), the_min (rows,) >= 0, L (rows, n) int32).
    """
    mn = np.minimum(x.min(axis=-1), _F32(0))  # `if (min > 0) min = 0`
    mx = x.max(axis=-1)
    flat = mx == mn
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)

    def error(scale, m, lf):
        diff = scale[:, None] * lf + m[:, None] - x
        return _seqsum(w * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F32(nmax) / (mx - mn)
        scale = (_F32(1) / iscale).astype(_F32)
        L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        best = error(scale, mn, L.astype(_F32))
        for step in range(nstep + 1):
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (mx - mn)
            l = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
            lf = l.astype(_F32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0  # a positive min is not allowed: refit the scale alone
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale).astype(_F32)
            this_min = np.where(clamp, _F32(0), this_min).astype(_F32)
            cur = error(this_scale, this_min, lf)
            better = ~flat & (D > 0) & (cur < best)
            L = np.where(better[:, None], l, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale).astype(_F32)
            mn = np.where(better, this_min, mn).astype(_F32)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    return scale, (-mn).astype(_F32), np.where(flat[:, None], 0, L)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins into 12 bytes (inverse of ggml ``get_scale_min_k4``).

    ls, lm: (nb, 8) uint8 <= 63 -> (nb, 12) uint8. Bytes 0-3: scales 0-3 (high bits: scales 4-7
    >> 4); 4-7: mins 0-3 (high bits: mins 4-7 >> 4); 8-11: low nibbles of scale | min 4-7.
    """
    return np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], axis=1).astype(np.uint8)


def _unpack_k4_scales(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml ``get_scale_min_k4`` for all 8 sub-blocks: (nb, 12) uint8 -> two (nb, 8) uint8."""
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits: byte ``32*h + l`` holds ``L[128h + 32j + l]`` at bits 2j (j = 0..3).

    L: (nb, 256) ints in [0, 3] -> (nb, 64) uint8.
    """
    planes = L.reshape(-1, 2, 4, 32).astype(np.uint8) << (2 * np.arange(4, dtype=np.uint8))[:, None]
    return np.bitwise_or.reduce(planes, axis=2).reshape(-1, 64)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_2bit`: (nb, 64) uint8 -> (nb, 256) uint8 in [0, 3]."""
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


# ---------------------------------------------------------------- the block-format base class


class BlockFormat:
    """One ggml block format. Subclasses declare the block and write two block-level methods.

    Class keywords: ``ggml_type`` (the GGML_TYPE_* id), ``block_size`` (weights per block) and
    ``layout`` (the C struct as a packed little-endian numpy structured dtype; its itemsize is the
    type size). Defining a subclass registers it under its class name.
    """

    name: ClassVar[str]
    ggml_type: ClassVar[int]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    layout: ClassVar[np.dtype]

    def __init_subclass__(cls, *, ggml_type: int, block_size: int, layout: np.dtype, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.name, cls.ggml_type, cls.block_size = cls.__name__, ggml_type, block_size
        cls.layout, cls.type_size = layout, layout.itemsize
        if cls.name in _FORMATS:
            raise TypeError(f"GGUF block format {cls.name} is defined twice")
        _FORMATS[cls.name] = cls

    # -- what each format writes

    @classmethod
    def quantize_blocks(cls, x: np.ndarray) -> np.ndarray:
        """(n_blocks, block_size) finite float32 -> (n_blocks,) records of ``layout``."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, b: np.ndarray) -> np.ndarray:
        """(n_blocks,) records of ``layout`` -> (n_blocks, block_size) float32."""
        raise NotImplementedError

    # -- the contract, checked once here

    @classmethod
    def bits_per_weight(cls) -> float:
        return cls.type_size * 8 / cls.block_size

    @classmethod
    def quantize(cls, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":
            raise ValueError(f"{cls.name}: cannot quantize an array of dtype {x.dtype}")
        if x.ndim == 0:
            raise ValueError(f"{cls.name}: cannot quantize a 0-d array; give rows of weights")
        if x.shape[-1] % cls.block_size:
            raise ValueError(f"{cls.name}: row length {x.shape[-1]} is not a multiple of the block "
                             f"size {cls.block_size}")
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused below
            x32 = x.astype(_F32)  # ggml quantizes from float32; wider input is rounded first
        finite = np.isfinite(x32)
        if not finite.all():
            where = np.unravel_index(int(np.argmin(finite)), x.shape)
            raise ValueError(f"{cls.name}: input has {x.size - int(finite.sum())} non-finite "
                             f"value(s) in float32 (first at index {where}: {x[where]!r})")
        out_shape = (*x.shape[:-1], x.shape[-1] // cls.block_size * cls.type_size)
        if x.size == 0:
            return np.zeros(out_shape, dtype=np.uint8)
        with np.errstate(all="ignore"):  # masked-out lanes may divide by zero, as C never would
            records = cls.quantize_blocks(np.ascontiguousarray(x32).reshape(-1, cls.block_size))
        assert records.dtype == cls.layout and records.shape == (x.size // cls.block_size,)
        return records.view(np.uint8).reshape(out_shape)

    @classmethod
    def dequantize(cls, data, shape) -> np.ndarray:
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = np.frombuffer(data, dtype=np.uint8)
        data = np.asarray(data)
        if data.dtype != np.uint8:
            raise ValueError(f"{cls.name}: raw blocks must be uint8 bytes, got dtype {data.dtype}")
        if not shape or shape[-1] % cls.block_size or min(shape) < 0:
            raise ValueError(f"{cls.name}: shape {shape} has no last dimension that is a multiple of "
                             f"the block size {cls.block_size}")
        n_blocks = math.prod(shape) // cls.block_size
        if data.size != n_blocks * cls.type_size:
            raise ValueError(f"{cls.name}: shape {shape} needs {n_blocks} blocks = "
                             f"{n_blocks * cls.type_size} bytes, got {data.size} bytes")
        if n_blocks == 0:
            return np.zeros(shape, dtype=_F32)
        records = np.ascontiguousarray(data).reshape(n_blocks, cls.type_size).view(cls.layout)[:, 0]
        out = cls.dequantize_blocks(records)
        assert out.dtype == _F32 and out.shape == (n_blocks, cls.block_size)
        return out.reshape(shape)


def _layout(*fields) -> np.dtype:
    """A packed (no padding) little-endian block struct."""
    return np.dtype(list(fields))


# ---------------------------------------------------------------- blocks of 32


class Q8_0(BlockFormat, ggml_type=8, block_size=32,
           layout=_layout(("d", "<f2"), ("qs", "i1", (32,)))):
    """``block_q8_0``: x = d * q, q in [-127, 127]. quantize_row_q8_0_ref / dequantize_row_q8_0."""

    @classmethod
    def quantize_blocks(cls, x):
        d = np.abs(x).max(axis=1) / _F32(127)  # (n,)  d = amax / ((1 << 7) - 1)
        out = np.zeros(len(x), cls.layout)
        out["d"] = _fp16(d)
        # y.qs[j] = roundf(x[j] * id): id from the unrounded d, halves away from zero
        out["qs"] = _roundf(x * _safe_inverse(d)[:, None]).astype(np.int8)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        return b["qs"].astype(_F32) * _f32(b["d"])[:, None]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16): byte j = q[j] | q[j + 16] << 4 (low nibbles: first half)."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes in [0, 15], first the low nibbles then the high ones."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _pack_bit4(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> uint32 ``qh`` with bit j = bit 4 of q[j]."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1)


def _unpack_bit4(qh: np.ndarray) -> np.ndarray:
    """uint32 (n,) -> (n, 32) uint8 with values 0 or 16."""
    return (((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


class Q4_0(BlockFormat, ggml_type=2, block_size=32,
           layout=_layout(("d", "<f2"), ("qs", "u1", (16,)))):
    """``block_q4_0``: x = d * (q - 8), q in [0, 15]. quantize_row_q4_0_ref / dequantize_row_q4_0.

    d = max / -8 where max is the signed value of largest magnitude, so that value codes to 0
    exactly and the opposite end (+8) saturates at 7.
    """

    @classmethod
    def quantize_blocks(cls, x):
        d = _first_absmax(x) / _F32(-8)  # (n,)
        out = np.zeros(len(x), cls.layout)
        out["d"] = _fp16(d)
        # MIN(15, (int8_t)(x*id + 8.5f)): +8.5 then truncation = round half up around the offset
        q = np.minimum(15, np.trunc(x * _safe_inverse(d)[:, None] + _F32(8.5)))
        out["qs"] = _pack_nibbles(q)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        q = _unpack_nibbles(b["qs"]).astype(np.int8) - np.int8(8)
        return _f32(b["d"])[:, None] * q.astype(_F32)


class Q4_1(BlockFormat, ggml_type=3, block_size=32,
           layout=_layout(("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,)))):
    """``block_q4_1``: x = d * q + m, q in [0, 15]. quantize_row_q4_1_ref / dequantize_row_q4_1."""

    @classmethod
    def quantize_blocks(cls, x):
        mn, mx = _first_min(x), _first_max(x)
        d = (mx - mn) / _F32(15)
        out = np.zeros(len(x), cls.layout)
        out["d"], out["m"] = _fp16(d), _fp16(mn)
        # MIN(15, (int8_t)((x - min)*id + 0.5f)); min and id are the unrounded float32 values
        q = np.minimum(15, np.trunc((x - mn[:, None]) * _safe_inverse(d)[:, None] + _F32(0.5)))
        out["qs"] = _pack_nibbles(q)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        q = _unpack_nibbles(b["qs"]).astype(_F32)
        return _f32(b["d"])[:, None] * q + _f32(b["m"])[:, None]  # two roundings, no FMA


class Q5_0(BlockFormat, ggml_type=6, block_size=32,
           layout=_layout(("d", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,)))):
    """``block_q5_0``: x = d * (q - 16), q in [0, 31]; bit 4 of q[j] is bit j of ``qh``.

    quantize_row_q5_0_ref / dequantize_row_q5_0 (``qh`` is ``uint8_t[4]`` memcpy'd as uint32).
    """

    @classmethod
    def quantize_blocks(cls, x):
        d = _first_absmax(x) / _F32(-16)
        out = np.zeros(len(x), cls.layout)
        out["d"] = _fp16(d)
        q = np.minimum(31, np.trunc(x * _safe_inverse(d)[:, None] + _F32(16.5)))
        out["qh"], out["qs"] = _pack_bit4(q), _pack_nibbles(q)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        q = (_unpack_nibbles(b["qs"]) | _unpack_bit4(b["qh"])).astype(np.int8) - np.int8(16)
        return _f32(b["d"])[:, None] * q.astype(_F32)


class Q5_1(BlockFormat, ggml_type=7, block_size=32,
           layout=_layout(("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", (16,)))):
    """``block_q5_1``: x = d * q + m, q in [0, 31]. quantize_row_q5_1_ref / dequantize_row_q5_1."""

    @classmethod
    def quantize_blocks(cls, x):
        mn, mx = _first_min(x), _first_max(x)
        d = (mx - mn) / _F32(31)
        out = np.zeros(len(x), cls.layout)
        out["d"], out["m"] = _fp16(d), _fp16(mn)
        # (uint8_t)((x - min)*id + 0.5f): no MIN here in C; the value never exceeds 31.5
        q = np.trunc((x - mn[:, None]) * _safe_inverse(d)[:, None] + _F32(0.5))
        out["qh"], out["qs"] = _pack_bit4(q), _pack_nibbles(q)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        q = (_unpack_nibbles(b["qs"]) | _unpack_bit4(b["qh"])).astype(_F32)
        return _f32(b["d"])[:, None] * q + _f32(b["m"])[:, None]


# ---------------------------------------------------------------- K-quants: super-blocks of 256


class Q2_K(BlockFormat, ggml_type=10, block_size=QK_K,
           layout=_layout(("scales", "u1", (16,)), ("qs", "u1", (64,)), ("d", "<f2"), ("dmin", "<f2"))):
    """``block_q2_K``: 16 sub-blocks of 16, x = d*sc * q - dmin*m with 4-bit sc, m; q in [0, 3].

    quantize_row_q2_K_ref (make_qkx2_quants with |x| weights, mean absolute error) /
    dequantize_row_q2_K.
    """

    @classmethod
    def quantize_blocks(cls, x):
        nb = len(x)
        xs = x.reshape(nb * 16, 16)  # (sub-blocks, 16)
        scales, mins, L = _make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = np.maximum(scales.max(axis=1), _F32(0))  # (nb,)
        max_min = np.maximum(mins.max(axis=1), _F32(0))
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _nearest_int((_F32(15) / max_scale)[:, None] * scales)
        lm = _nearest_int((_F32(15) / max_min)[:, None] * mins)
        # y.scales[j] = l; then y.scales[j] |= (l << 4): both truncated to a byte
        byte = np.where(has_s[:, None], _as_u8(ls), 0) | np.where(has_m[:, None], _as_u8(lm << 4), 0)
        out = np.zeros(nb, cls.layout)
        out["scales"] = byte
        out["d"] = _fp16(np.where(has_s, max_scale / _F32(15), _F32(0)))
        out["dmin"] = _fp16(np.where(has_m, max_min / _F32(15), _F32(0)))
        # requantize with the stored (fp16, 4-bit) scales; where d == 0 ggml keeps the search's L
        d = (_f32(out["d"])[:, None] * (byte & 0xF)).reshape(-1, 1)
        dm = (_f32(out["dmin"])[:, None] * (byte >> 4)).reshape(-1, 1)
        Lr = np.clip(_nearest_int((xs + dm) / d), 0, 3)
        L = np.where(d != 0, Lr, L).reshape(nb, QK_K)
        out["qs"] = _pack_2bit(L)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        nb = len(b)
        sc = b["scales"]
        dl = (_f32(b["d"])[:, None] * (sc & 0xF).astype(_F32))[:, :, None]  # (nb, 16, 1)
        ml = (_f32(b["dmin"])[:, None] * (sc >> 4).astype(_F32))[:, :, None]
        q = _unpack_2bit(b["qs"]).reshape(nb, 16, 16).astype(_F32)
        return (dl * q - ml).reshape(nb, QK_K)


def _q3_scale_bytes(l: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit Q3_K scales (nb, 16) into 12 bytes (the packing in quantize_row_q3_K_ref).

    Bytes 0-7: low nibble of scale j (j < 8) | low nibble of scale j + 8 << 4;
    bytes 8-11: byte 8 + j%4 holds the top two bits of scale j at bit 2*(j // 4).
    """
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    high = np.bitwise_or.reduce(
        ((l >> 4) & 3).reshape(-1, 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=1)
    return np.concatenate([low, high], axis=1).astype(np.uint8)


def _q3_scales(q: np.ndarray) -> np.ndarray:
    """(nb, 12) bytes -> (nb, 16) signed scales (6-bit code - 32), as dequantize_row_q3_K."""
    low = np.concatenate([q[:, :8] & 0xF, q[:, :8] >> 4], axis=1)
    high = (q[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (nb, 4, 4)
    return (low | (high.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)


class Q3_K(BlockFormat, ggml_type=11, block_size=QK_K,
           layout=_layout(("hmask", "u1", (32,)), ("qs", "u1", (64,)), ("scales", "u1", (12,)),
                          ("d", "<f2"))):
    """``block_q3_K``: 16 sub-blocks of 16, x = d * sc * q, sc in [-32, 31], q in [-4, 3].

    The low two bits of q are in ``qs`` (as Q2_K), the third in ``hmask`` (bit set = no -4).
    quantize_row_q3_K_ref (make_q3_quants) / dequantize_row_q3_K.
    """

    @classmethod
    def quantize_blocks(cls, x):
        nb = len(x)
        xs = x.reshape(nb * 16, 16)
        scales, L = _make_q3_quants(xs, 4)
        scales = scales.reshape(nb, 16)
        max_scale = _first_absmax(scales)  # (nb,) signed
        has = max_scale != 0
        iscale = _F32(-32) / max_scale
        # int8_t l = nearest_int(iscale*scales[j]); l = MAX(-32, MIN(31, l)) + 32
        l = (np.clip(_as_i8(_nearest_int(iscale[:, None] * scales)), -32, 31) + 32).astype(np.uint8)
        out = np.zeros(nb, cls.layout)
        out["scales"] = np.where(has[:, None], _q3_scale_bytes(l), 0)
        out["d"] = _fp16(np.where(has, _F32(1) / iscale, _F32(0)))
        d = (_f32(out["d"])[:, None] * _q3_scales(out["scales"]).astype(_F32)).reshape(-1, 1)
        Lr = np.clip(_nearest_int(xs / d), -4, 3) + 4
        L = np.where(d != 0, Lr, L).reshape(nb, QK_K)
        # hmask: bit j//32 of byte j%32 is set when L[j] > 3 (and then 4 is taken off L[j])
        high = (L > 3).reshape(nb, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None]
        out["hmask"] = np.bitwise_or.reduce(high, axis=1)
        out["qs"] = _pack_2bit(np.where(L > 3, L - 4, L))
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        nb = len(b)
        dl = (_f32(b["d"])[:, None] * _q3_scales(b["scales"]).astype(_F32))[:, :, None]
        h = (b["hmask"][:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (nb, 8, 32)
        q = _unpack_2bit(b["qs"]).astype(np.int8) - ((1 - h.reshape(nb, QK_K)) << 2).astype(np.int8)
        return (dl * q.reshape(nb, 16, 16).astype(_F32)).reshape(nb, QK_K)


def _kx2_scale_codes(scales: np.ndarray, mins: np.ndarray):
    """Shared by Q4_K/Q5_K ``_ref``: 6-bit codes of the 8 sub-block scales and mins per block.

    Returns (ls, lm (nb, 8) uint8, d, dmin (nb,) float32 before fp16).
    """
    max_scale = np.maximum(scales.max(axis=1), _F32(0))  # scales are >= 0: the min is deducted
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
    inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    # uint8_t ls = nearest_int(inv_scale*scales[j]); ls = MIN(63, ls)
    ls = np.minimum(63, _as_u8(_nearest_int(inv_scale[:, None] * scales)))
    lm = np.minimum(63, _as_u8(_nearest_int(inv_min[:, None] * mins)))
    return ls, lm, max_scale / _F32(63), max_min / _F32(63)


def _kx2_requantize(out, xs: np.ndarray, L: np.ndarray, nmax: int) -> np.ndarray:
    """Codes from the stored fp16 d, dmin and 6-bit scales; ggml keeps the search's L if d == 0."""
    sc, m = _unpack_k4_scales(out["scales"])
    d = (_f32(out["d"])[:, None] * sc.astype(_F32)).reshape(-1, 1)  # (sub-blocks, 1)
    dm = (_f32(out["dmin"])[:, None] * m.astype(_F32)).reshape(-1, 1)
    Lr = np.clip(_nearest_int((xs + dm) / d), 0, nmax)
    return np.where(d != 0, Lr, L).reshape(len(out), QK_K)


def _kx2_dequantize(b, q: np.ndarray) -> np.ndarray:
    """x = d*sc * q - dmin*m per 32-weight sub-block; q: (nb, 8, 32) codes."""
    sc, m = _unpack_k4_scales(b["scales"])
    d = (_f32(b["d"])[:, None] * sc.astype(_F32))[:, :, None]
    dm = (_f32(b["dmin"])[:, None] * m.astype(_F32))[:, :, None]
    return (d * q.astype(_F32) - dm).reshape(len(b), QK_K)


def _kx2_encode(cls, x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared first half of quantize_row_q4_K_ref / q5_K_ref: search, 6-bit scale codes, fp16
    d and dmin, then codes requantized from the stored scales -> (records, L (nb, 8, 32) uint8)."""
    xs, scales, mins, L = _kx2_search(x, nmax, rmin, rdelta, nstep)
    ls, lm, d, dmin = _kx2_scale_codes(scales, mins)
    out = np.zeros(len(x), cls.layout)
    out["scales"], out["d"], out["dmin"] = _pack_k4_scales(ls, lm), _fp16(d), _fp16(dmin)
    return out, _kx2_requantize(out, xs, L, nmax).reshape(-1, 8, 32).astype(np.uint8)


def _pack_k_nibbles(low: np.ndarray) -> np.ndarray:
    """(nb, 8, 32) 4-bit codes -> (nb, 128): byte ``32*c + l`` holds sub-block 2c in its low nibble
    and 2c+1 in its high nibble (Q4_K ``qs``, and the low bits of Q5_K)."""
    pairs = low.reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack_k_nibbles`: (nb, 128) bytes -> (nb, 8, 32) codes in [0, 15]."""
    qs = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)


def _kx2_search(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per 32-weight sub-block: weights av_x + |x| with av_x = sqrt(mean(x**2)), then qkx2."""
    xs = x.reshape(-1, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / _F32(32))
    scales, mins, L = _make_qkx2_quants(xs, av_x[:, None] + np.abs(xs), nmax, rmin, rdelta, nstep,
                                        use_mad=False)
    return xs, scales.reshape(len(x), 8), mins.reshape(len(x), 8), L


class Q4_K(BlockFormat, ggml_type=12, block_size=QK_K,
           layout=_layout(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)),
                          ("qs", "u1", (128,)))):
    """``block_q4_K``: 8 sub-blocks of 32, x = d*sc * q - dmin*m, 6-bit sc and m, q in [0, 15].

    quantize_row_q4_K_ref (make_qkx2_quants: rmin -1, rdelta 0.1, 20 steps) / dequantize_row_q4_K.
    ``qs`` packs sub-blocks in pairs (:func:`_pack_k_nibbles`).
    """

    @classmethod
    def quantize_blocks(cls, x):
        out, L = _kx2_encode(cls, x, 15, -1.0, 0.1, 20)
        out["qs"] = _pack_k_nibbles(L)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        return _kx2_dequantize(b, _unpack_k_nibbles(b["qs"]))


class Q5_K(BlockFormat, ggml_type=13, block_size=QK_K,
           layout=_layout(("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)),
                          ("qh", "u1", (32,)), ("qs", "u1", (128,)))):
    """``block_q5_K``: as Q4_K with q in [0, 31]; bit 4 of sub-block s's weight l is bit s of qh[l].

    quantize_row_q5_K_ref (make_qkx2_quants: rmin -0.5, rdelta 0.1, 15 steps) /
    dequantize_row_q5_K.
    """

    @classmethod
    def quantize_blocks(cls, x):
        out, L = _kx2_encode(cls, x, 31, -0.5, 0.1, 15)
        out["qh"] = np.bitwise_or.reduce((L >> 4) << np.arange(8, dtype=np.uint8)[:, None], axis=1)
        out["qs"] = _pack_k_nibbles(L & 0xF)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        high = ((b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4
        return _kx2_dequantize(b, _unpack_k_nibbles(b["qs"]) | high)


class Q6_K(BlockFormat, ggml_type=14, block_size=QK_K,
           layout=_layout(("ql", "u1", (128,)), ("qh", "u1", (64,)), ("scales", "i1", (16,)),
                          ("d", "<f2"))):
    """``block_q6_K``: 16 sub-blocks of 16, x = d * sc * (q - 32), 8-bit signed sc, q in [0, 63].

    quantize_row_q6_K_ref (make_qx_quants, rmse_type 1) / dequantize_row_q6_K. Per half h
    (128 weights): ql[64h + l] = q[l] | q[l+64] << 4 and ql[64h + 32 + l] = q[l+32] | q[l+96] << 4
    (low nibbles), qh[32h + l] holds the top two bits of q[l + 32g] at bit 2g.
    """

    @classmethod
    def quantize_blocks(cls, x):
        nb = len(x)
        xs = x.reshape(nb * 16, 16)
        scales, L = _make_qx_quants(xs, 32)
        scales = scales.reshape(nb, 16)
        max_scale = _first_absmax(scales)
        live = np.abs(max_scale) >= GROUP_MAX_EPS  # otherwise ggml memsets the block to zero
        iscale = _F32(-128) / max_scale
        out = np.zeros(nb, cls.layout)
        out["d"] = _fp16(np.where(live, _F32(1) / iscale, _F32(0)))
        # y.scales[ib] = MIN(127, nearest_int(iscale*scales[ib])), stored as int8_t
        sc = _as_i8(np.minimum(127, _nearest_int(iscale[:, None] * scales)))
        out["scales"] = np.where(live[:, None], sc, 0)
        d = (_f32(out["d"])[:, None] * out["scales"].astype(_F32)).reshape(-1, 1)
        Lr = np.clip(_nearest_int(xs / d), -32, 31) + 32
        L = np.where(d != 0, Lr, L)
        L = np.where(live[:, None], L.reshape(nb, QK_K), 0).reshape(nb, 2, 4, 32).astype(np.uint8)
        low = L & 0xF  # (nb, half, group, 32)
        out["ql"] = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4),
                                    low[:, :, 1] | (low[:, :, 3] << 4)], axis=2).reshape(nb, 128)
        out["qh"] = np.bitwise_or.reduce((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None],
                                         axis=2).reshape(nb, 64)
        return out

    @classmethod
    def dequantize_blocks(cls, b):
        nb = len(b)
        ql = b["ql"].reshape(nb, 2, 2, 32)  # (nb, half, first/second 32 bytes, 32)
        low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # groups 0, 1, 2, 3
        qh = b["qh"].reshape(nb, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
        q = (low | ((qh & 3) << 4)).astype(np.int8) - np.int8(32)
        d = (_f32(b["d"])[:, None] * b["scales"].astype(_F32))[:, :, None]  # (nb, 16, 1)
        return (d * q.reshape(nb, 16, 16).astype(_F32)).reshape(nb, QK_K)


# ---------------------------------------------------------------- public API


def _format(type_name) -> type[BlockFormat]:
    name = getattr(type_name, "name", type_name)  # accepts gguf.GGMLQuantizationType members too
    if not isinstance(name, str) or name.upper() not in _FORMATS:
        raise ValueError(f"unknown GGUF block type {type_name!r}; known: {', '.join(formats())}")
    return _FORMATS[name.upper()]


def formats() -> tuple[str, ...]:
    """Names of the registered block formats, e.g. ``("Q8_0", "Q4_0", ...)``."""
    return tuple(_FORMATS)


def block_size(type_name) -> int:
    """Weights per block (32, or 256 for K-quants)."""
    return _format(type_name).block_size


def type_size(type_name) -> int:
    """Bytes per block."""
    return _format(type_name).type_size


def bits_per_weight(type_name) -> float:
    """Storage cost including scales, e.g. 4.5 for Q4_0, 6.5625 for Q6_K."""
    return _format(type_name).bits_per_weight()


def records(blocks, type_name) -> np.ndarray:
    """Raw blocks viewed as the format's C struct: (n_blocks,) records with its fields (``d``, ``qs``...).

    A view, not a copy; the byte count must be a whole number of blocks.
    """
    fmt = _format(type_name)
    data = np.frombuffer(blocks, np.uint8) if isinstance(blocks, (bytes, bytearray, memoryview)) else np.asarray(blocks)
    if data.dtype != np.uint8 or data.size % fmt.type_size:
        raise ValueError(f"{fmt.name}: {data.size} bytes of {data.dtype} are not whole {fmt.type_size}-byte blocks")
    return np.ascontiguousarray(data).reshape(-1, fmt.type_size).view(fmt.layout)[:, 0]


def quantize(x, type_name) -> np.ndarray:
    """Quantize rows of ``x`` (last dimension a multiple of the block size) to raw GGUF blocks.

    Returns uint8 of shape ``(*x.shape[:-1], x.shape[-1] // block_size * type_size)``, the
    bytes ggml's reference quantizer writes for these float32 values.
    """
    return _format(type_name).quantize(x)


def dequantize(blocks, type_name, shape) -> np.ndarray:
    """Decode raw GGUF blocks (uint8 array or bytes) to a float32 array of ``shape``."""
    return _format(type_name).dequantize(blocks, shape)
