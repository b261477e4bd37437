"""Round-to-nearest (RTN): the baseline GPTQ is measured against, with the same grid and options.

Frantar et al. 2022 (arXiv:2210.17323) compare GPTQ with "round-to-nearest (RTN)": every weight
rounded independently onto a uniform asymmetric (or symmetric) min-max grid, per output row and,
with grouping, per group of ``group_size`` consecutive input columns (§5, "Baselines"). The grid is
the one GPTQ itself quantizes onto (``GridParams``), so RTN and GPTQ differ only in *which* grid
point each weight takes, never in the grid.

The min-max grid follows the GPTQ reference code's ``Quantizer.find_params`` (per-row, the range
widened to hold 0, symmetric range ``max(|min|, max)``, zero point ``(maxq + 1) / 2`` when
symmetric; an all-zero row gets the range [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridParams:
    """A uniform grid per row: ``q = clamp(round(w / scale) + zero, 0, maxq)``, ``w^ = scale * (q - zero)``."""

    scale: torch.Tensor  # (rows, 1), > 0
    zero: torch.Tensor  # (rows, 1), integer-valued float in [0, maxq]
    maxq: int  # 2**bits - 1


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits={bits}: GPTQ's grids here are {BITS}")
    return 2**bits - 1


def find_params(w: torch.Tensor, bits: int, sym: bool) -> GridParams:
    """The min-max grid of each row of ``w`` (rows, cols). See the module docstring."""
    maxq = check_bits(bits)
    zeros = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    xmin = torch.minimum(w.min(dim=1).values, zeros)  # (rows,): the grid always holds 0
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return GridParams(scale.unsqueeze(1), zero.unsqueeze(1), maxq)


def quantize(w: torch.Tensor, p: GridParams) -> torch.Tensor:
    """Round ``w`` (rows, k) onto the grid ``p`` and return the dequantized values (rows, k)."""
    q = torch.clamp(torch.round(w / p.scale) + p.zero, 0, p.maxq)
    return p.scale * (q - p.zero)


def group_bounds(columns: int, group_size: int) -> list[tuple[int, int]]:
    """Column ranges ``[start, end)`` of the groups; ``group_size <= 0`` means one group (per row)."""
    size = columns if group_size <= 0 else group_size
    return [(start, min(start + size, columns)) for start in range(0, columns, size)]


def rtn_quantize_linear(W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False):
    """Round-to-nearest ``W`` (out, in) -> ``(Q dequantized (out, in), scales (out, groups), zeros (out, groups))``."""
    W = W.float()
    Q = torch.empty_like(W)
    scales, zeros = [], []
    for start, end in group_bounds(W.shape[1], group_size):
        p = find_params(W[:, start:end], bits, sym)
        Q[:, start:end] = quantize(W[:, start:end], p)
        scales.append(p.scale)
        zeros.append(p.zero)
    return Q, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


__all__ = ["BITS", "GridParams", "find_params", "group_bounds", "quantize", "rtn_quantize_linear"]
