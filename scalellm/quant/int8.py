"""LLM.int8(): vector-wise int8 quantization and the mixed-precision matmul (Dettmers et al. 2022,
arXiv:2208.07339, §3).

§3.1 *Vector-wise quantization*: every row of the activation ``X`` (one token) and every output row
of the weight ``W`` gets its own absmax scale; codes are ``round(x * 127 / absmax)`` and the int8
product ``Cx @ Cw.T`` (exact in int32) is rescaled by the outer product of the two absmax vectors
over ``127**2``.

§3.2 *Mixed-precision decomposition*: the few feature dimensions (columns of ``X``) that hold any
value of magnitude >= ``threshold`` (6.0 in the paper) are taken out of the int8 product and
multiplied in 16-bit: ``Y = X[:, O] @ W[:, O].T + (int8 part over the other columns)``.

The quantizer follows bitsandbytes 0.50 ``int8_vectorwise_quant`` (default backend, which is what
runs on CPU) bit for bit:

- ``row_stats = max |x|`` per row, over the values with ``|x| < threshold`` (bnb zeroes the outlier
  *elements*, not the whole outlier columns, before taking the max), returned as float32;
- ``codes = round(x * (127.0 / row_stats))``; torch evaluates ``127.0 / t`` as ``t.reciprocal() * 127``
  (float32 reciprocal, then a float32 product: about a quarter of scales differ in the last bit from
  a true division, which moves codes of 16-bit inputs sitting near a .5 tie), then a float32 product
  with x and rounding half to even (``torch.round``): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2;
- the codes of every outlier column are zeroed in every row; the outlier column indices are the
  sorted columns with any ``|x| >= threshold`` (``argwhere(outliers.any(dim=0))``, int64).

bnb returns ``(codes int8 (rows, cols), row_stats float32 (rows,), outlier_cols int64 or None)``:
``None`` when ``threshold`` is 0, an empty tensor when no column crosses it. Its default backend
takes float16, bfloat16 and float32 (the product is float32 in every case, so the codes depend only
on the values); the CUDA kernel takes float16 only, and ``Linear8bitLt`` casts activations to
float16 before quantizing them (bfloat16 activations are rounded to fp16 there; not here).

bnb leaves two cases to undefined float->int conversion: an all-zero row gives ``0 * inf = NaN``
codes, which x86 and ARM cast to 0 (so do we, by definition), and NaN/inf input (bnb returns NaN/inf
row stats and zero codes on CPU); this reference rejects NaN and inf with ValueError instead.
The CUDA kernel (``kInt8VectorQuant``) computes the scale with the approximate ``__fdividef`` and
may differ in a few codes; the conformance suite measures that share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scalellm.quant.blockwise import as_float32

OUTLIER_THRESHOLD = 6.0  # LLM.int8 §3.2: threshold alpha = 6.0; transformers' llm_int8_threshold default
INT8_MAX = np.float32(127.0)  # symmetric int8 range [-127, 127] (§3.1); -128 is never produced
INV_127 = np.float32(1.0 / 127.0)  # bnb int8_vectorwise_dequant multiplies by 7.874015718698502e-3 == this
DTYPES = ("float32", "float16", "bfloat16")  # input dtypes bnb's int8_vectorwise_quant accepts on CPU
WEIGHT_OUTLIERS = ("original", "dequantized")  # where the 16-bit outlier weight columns come from


@dataclass(frozen=True)
class Int8State:
    """A vector-wise int8 quantized matrix, with its outlier columns kept aside in 16-bit."""

    codes: np.ndarray  # (rows, cols) int8: round(x * 127 / row_stats); outlier columns are 0
    row_stats: np.ndarray  # (rows,) float32: absmax of each row over its non-outlier values
    outlier_cols: np.ndarray  # (n_outliers,) int64, ascending: columns with any |x| >= threshold
    outlier_values: np.ndarray  # (rows, n_outliers) float32: those columns, unquantized (16-bit values)
    threshold: float  # 0.0: no decomposition
    shape: tuple[int, ...]  # input shape; rows = prod(shape[:-1]), cols = shape[-1]
    dtype: str  # input dtype: "float32", "float16" or "bfloat16"


# --------------------------------------------------------------------------------------------
# input handling


def dtype_name(x) -> str:
    """The dtype of a torch tensor or numpy array, as a plain name ("float16", ...)."""
    if hasattr(x, "detach"):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name


def as_matrix(x) -> tuple[np.ndarray, tuple[int, ...], str]:
    """A torch tensor or numpy array -> (float32 (rows, cols), shape, dtype name).

    Widening is exact (:func:`scalellm.quant.blockwise.as_float32`); leading dimensions are rows
    (tokens), as bnb's ``MatMul8bitLt`` reshapes a 3-D input to ``(-1, cols)``. A 1-D input is one row.
    Raises ValueError for other dtypes, empty input, NaN or inf.
    """
    dtype = dtype_name(x)
    if dtype not in DTYPES:
        raise ValueError(f"int8 quantization takes {', '.join(DTYPES)} input, got {dtype}")
    flat, shape, dtype = as_float32(x)
    if len(shape) == 0 or shape[-1] == 0:
        raise ValueError(f"int8 quantization needs at least one column, got shape {shape}")
    matrix = flat.reshape(-1, shape[-1])  # (rows, cols)
    check_finite(matrix)
    return matrix, shape, dtype


def check_finite(x: np.ndarray) -> None:
    """Raise ValueError naming the first NaN or inf of ``x`` (rows, cols) by (row, column)."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    row, col = (int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))
    kind = "NaN" if np.isnan(x[row, col]) else "inf"
    raise ValueError(f"cannot quantize {kind} (first at row {row}, column {col}: {x[row, col]})")


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64/float32 ``values`` to ``dtype`` (nearest, ties to even) -> float32 array.

    float16 through numpy; bfloat16 by rounding the float32 bits to their top half (what torch's
    ``.to(torch.bfloat16)`` does); float32 as is.
    """
    f32 = np.asarray(values, dtype=np.float32)
    if dtype == "float16":
        return f32.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        bits = f32.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return f32


# --------------------------------------------------------------------------------------------
# §3.2 outlier features and §3.1 vector-wise quantization


def outlier_features(x: np.ndarray, threshold: float = OUTLIER_THRESHOLD) -> np.ndarray:
    """Feature dimensions (columns of ``x`` (rows, cols)) holding any ``|x| >= threshold``.

    -> (n_outliers,) int64, ascending; empty when ``threshold`` is 0 (no decomposition).
    bnb ``int8_vectorwise_quant``: ``argwhere((A.abs() >= threshold).any(dim=0))``.
    """
    if threshold <= 0.0:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero((np.abs(x) >= np.float32(threshold)).any(axis=0)).astype(np.int64)


def row_absmax(x: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Absmax of each row of ``x`` (rows, cols) over its values with ``|x| < threshold`` -> (rows,) float32.

    bnb ``int8_vectorwise_quant`` zeroes the outlier elements, then ``A.abs().max(dim=1)``;
    ``threshold`` 0 keeps every value. An all-zero (or all-outlier) row gives 0.
    """
    a = np.abs(x)
    if threshold > 0.0:
        a = np.where(a >= np.float32(threshold), np.float32(0.0), a)
    return a.max(axis=1).astype(np.float32)


def vectorwise_codes(x: np.ndarray, row_stats: np.ndarray) -> np.ndarray:
    """``round(x * (127 / row_stats))`` per row -> (rows, cols) int8.

    bnb ``int8_vectorwise_quant``: ``torch.round(A * (127.0 / row_stats.unsqueeze(-1)))``. The
    scale is what torch computes for ``127.0 / t``: ``float32(1 / t) * 127`` (reciprocal first; a
    true division differs in the last bit for ~25% of scales and then flips ~0.01% of fp16 codes).
    Then a float32 product with ``x``, rounded half to even. Rows with absmax 0 get code 0 (bnb: NaN cast to
    int8). Rows so tiny that the float32 scale overflows (absmax < 127 / float32 max) divide in
    float64 instead (bnb's result there is an undefined cast).
    """
    with np.errstate(divide="ignore"):
        scale = (np.float32(1.0) / row_stats) * INT8_MAX  # (rows,) float32, reciprocal first
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = x * scale[:, None]  # (rows, cols) float32
    tiny = np.flatnonzero(np.isinf(scale) & (row_stats > 0))
    if tiny.size:
        scaled[tiny] = x[tiny].astype(np.float64) * 127.0 / row_stats[tiny, None].astype(np.float64)
    scaled[row_stats == 0] = 0.0
    return np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)


def vectorwise_quantize(x, threshold: float = 0.0) -> Int8State:
    """Vector-wise int8 quantization of the rows of ``x`` (LLM.int8 §3.1), with the §3.2 outlier
    columns set aside when ``threshold`` > 0.

    ``x``: (..., cols), float32/float16/bfloat16, torch or numpy. Steps (bnb ``int8_vectorwise_quant``):
      1. widen to float32, rows = leading dims;                          (rows, cols)
      2. outlier columns: any ``|x| >= threshold`` (:func:`outlier_features`);  (n_outliers,)
      3. row absmax over the non-outlier values (:func:`row_absmax`);      (rows,) float32
      4. codes ``round(x * 127 / absmax)`` (:func:`vectorwise_codes`);     (rows, cols) int8
      5. zero the codes of the outlier columns; keep their 16-bit values.  (rows, n_outliers)
    The codes, row stats and outlier columns equal bnb's (which returns ``None`` for the columns
    when ``threshold`` is 0; here they are empty). For a weight ``W`` (out, in) this is the
    "column-wise" quantization of the paper's ``W`` (in, out): one scale per output feature.
    Raises ValueError for NaN, inf, a negative threshold or an unsupported dtype.
    """
    if threshold < 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    matrix, shape, dtype = as_matrix(x)
    cols = outlier_features(matrix, threshold)
    stats = row_absmax(matrix, threshold)
    codes = vectorwise_codes(matrix, stats)
    codes[:, cols] = 0
    return Int8State(codes, stats, cols, matrix[:, cols].copy(), float(threshold), shape, dtype)


def vectorwise_dequantize(state: Int8State) -> np.ndarray:
    """``codes * row_stats / 127`` with the outlier columns restored -> float32 array of ``state.shape``.

    bnb ``int8_vectorwise_dequant``: ``A * stats.view(-1, 1) * 7.874015718698502e-3`` in float32
    (product with the stats first, then with float32(1/127)). bnb has no outlier values to restore.
    """
    values = (state.codes.astype(np.float32) * state.row_stats[:, None]) * INV_127  # (rows, cols)
    values[:, state.outlier_cols] = state.outlier_values
    return values.reshape(state.shape)


# --------------------------------------------------------------------------------------------
# §3.2 the mixed-precision matmul


def int8_matmul(x_state: Int8State, w_state: Int8State) -> np.ndarray:
    """The int8 part ``(Cx @ Cw.T) * (row_stats_x ⊗ row_stats_w) / 127**2`` -> (rows, out) float64.

    ``Cx`` (rows, k), ``Cw`` (out, k). The integer product is exact (float64 holds every int32
    sum), and so is the rescaling up to one float64 rounding. bnb: ``int8_linear_matmul`` (int32),
    then ``int8_mm_dequant``, which on CPU multiplies by ``6.200124e-05`` (1.8e-5 above 1/127**2,
    a typo for 6.2000124e-05; the CUDA kernel's 6.200012e-05 is right to float32 precision).
    """
    acc = x_state.codes.astype(np.float64) @ w_state.codes.astype(np.float64).T  # (rows, out)
    return acc * np.outer(x_state.row_stats, w_state.row_stats) / 127.0**2


def outlier_matmul(x_state: Int8State, w_outliers: np.ndarray) -> np.ndarray:
    """The 16-bit part ``X[:, O] @ W[:, O].T`` -> (rows, out) float64.

    ``x_state.outlier_values`` (rows, n_outliers) and ``w_outliers`` (out, n_outliers) hold 16-bit
    values; the product is accumulated in float64 (bnb: ``output.addmm(subA, subB)`` in 16-bit with
    fp32 accumulation, rounded once).
    """
    return x_state.outlier_values.astype(np.float64) @ w_outliers.astype(np.float64).T


def mixed_precision_matmul(
    x, weight, threshold: float = OUTLIER_THRESHOLD, *, outlier_weights: str = "original"
) -> np.ndarray:
    """``Y = X @ W.T`` by LLM.int8's mixed-precision decomposition (§3.2) -> float32 (..., out).

    ``x``: (..., k) activations; ``weight``: (out, k), as ``torch.nn.Linear`` stores it. The columns
    of ``x`` with any ``|x| >= threshold`` are multiplied in 16-bit (:func:`outlier_matmul`), the
    rest in int8 (:func:`int8_matmul`) with ``x`` quantized per row and ``weight`` per output row.
    ``outlier_weights``: "original" uses ``W[:, O]`` as given (the paper); "dequantized" uses the
    int8-dequantized weight columns rounded to ``x``'s dtype, which is all bnb's ``Linear8bitLt``
    with ``has_fp16_weights=False`` still holds (``int8_mixed_scaled_mm``).
    The result is rounded as bnb rounds it, to ``x``'s dtype: the int8 part once, then the sum.
    ``threshold`` 0: plain vector-wise int8 (bnb ``int8_scaled_mm``).
    """
    if outlier_weights not in WEIGHT_OUTLIERS:
        raise ValueError(f"outlier_weights must be one of {WEIGHT_OUTLIERS}, got {outlier_weights!r}")
    x_state = vectorwise_quantize(x, threshold)
    w_state = vectorwise_quantize(weight)
    w_matrix = as_matrix(weight)[0]  # (out, k)
    if x_state.codes.shape[1] != w_matrix.shape[1]:
        raise ValueError(f"inner dimensions differ: x {x_state.shape}, weight {w_state.shape}")
    if outlier_weights == "original":
        w_outliers = w_matrix[:, x_state.outlier_cols]  # (out, n_outliers)
    else:
        w_deq = (w_state.codes[:, x_state.outlier_cols].astype(np.float32) * w_state.row_stats[:, None]) * INV_127
        w_outliers = round_to(w_deq, x_state.dtype)
    y = round_to(int8_matmul(x_state, w_state), x_state.dtype).astype(np.float64)
    y = round_to(y + outlier_matmul(x_state, w_outliers), x_state.dtype)  # (rows, out)
    return y.reshape(*x_state.shape[:-1], w_matrix.shape[0])
