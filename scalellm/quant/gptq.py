"""GPTQ: accurate post-training quantization, as Frantar et al. 2022 (arXiv:2210.17323) define it.

For one linear layer with weight ``W`` (rows = outputs, columns = inputs) and calibration inputs
``X`` (columns, tokens), GPTQ looks for a quantized ``Q`` minimizing the layer's reconstruction error
``||WX - QX||²`` (§3, eq. 1). Its objective's Hessian is ``H = 2XXᵀ``, shared by every row. The
algorithm (§4, Algorithm 1):

1. **Hessian** ``H = 2XXᵀ`` accumulated over calibration batches (``Hessian``; kept as the running
   mean ``2XXᵀ/n``: GPTQ is invariant to the scale of H, and the mean stays well conditioned).
2. **Dead columns**: an input that is always 0 (``H_ii = 0``) carries no information; its weights
   are set to 0 and ``H_ii`` to 1 (the reference code's convention).
3. **Act-order** (optional; the reference repository's ``--act-order``, after the paper): columns
   are processed by decreasing ``diag(H)``, the inputs with the most energy first.
4. **Dampening** ``H += λI`` with ``λ = damp · mean(diag(H))`` (§4 "Cholesky reformulation":
   "1% of the average diagonal value").
5. **Cholesky reformulation** (§4 step 3): the rows of ``H⁻¹`` the OBQ update needs are those of the
   upper Cholesky factor of ``H⁻¹``; it is computed once (``_inverse_cholesky``).
6. **Column by column** (the OBQ update, eq. 2-3, in Cholesky form): quantize column ``i``,
   ``q = quant(w_i)``; its error ``E_i = (w_i - q) / [H⁻¹]_ii`` is fed back into the columns not
   yet quantized: ``W_{:, i:} -= E_i · [H⁻¹]_{i, i:}``.
7. **Lazy batch** (§4 step 2): the feedback is applied inside a block of ``B = 128`` columns at
   once; the later columns get the whole block's error in one matrix product
   ``W_{:, end:} -= E · [H⁻¹]_{block, end:}``.

**Grid and groups.** Each row is quantized onto a uniform min-max grid (``scalellm.quant.rtn``,
asymmetric or symmetric, 2/3/4/8 bits). With ``group_size = g > 0`` a new grid is chosen every
``g`` columns *in processing order*, from the weights as the feedback has left them (the paper's
§5 "grouping"). Two choices here, both stated:

* **Act-order + groups: the ``g_idx`` convention** (not "static groups"). A group is ``g``
  consecutive columns of the act-order permutation; ``g_idx[c]`` names the group of original column
  ``c``. That is what GPTQModel / transformers store for ``desc_act=True`` (so the library can be
  compared like for like) and it keeps GPTQ's rule of fitting each grid to the updated weights.
  Static groups (grids fitted up front on contiguous original columns) trade that for a kernel
  that needs no ``g_idx``.
* **Block size** is rounded to a multiple of ``g`` so a group never straddles a block: its grid
  is fitted to weights that carry all earlier feedback. (The reference code fits a group that
  starts inside a block to the block's *stale* copy; the two agree when ``g`` is a multiple of
  128, the common ``g = 128`` included.)

With ``H`` diagonal (uncorrelated inputs) ``[H⁻¹]_{i, j>i} = 0``: no error is fed back and GPTQ is
exactly round-to-nearest (``rtn_quantize_linear``) — the suite's sanity check.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from scalellm.environment import one_torch_thread
from scalellm.quant.rtn import GridParams, check_bits, find_params, quantize, rtn_quantize_linear

BLOCK_SIZE = 128  # B, the lazy-batch block (§4 step 2: "B = 128 columns")
DAMP = 0.01  # λ as a fraction of mean(diag(H)) (§4: "1% of the average diagonal value")


class Hessian:
    """``H = 2XXᵀ / n`` over every calibration token seen so far (§3: the Hessian of eq. 1)."""

    def __init__(self, columns: int, device: str | torch.device = "cpu"):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)  # (cols, cols)
        self.n = 0  # tokens seen

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (..., columns): one row per token."""
        x = x.detach().reshape(-1, self.H.shape[0]).to(self.H.device, torch.float32)  # (m, cols)
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def hessian(X: torch.Tensor) -> Hessian:
    """The Hessian of inputs ``X`` (tokens, columns) in one batch."""
    h = Hessian(X.shape[-1], X.device)
    h.add(X)
    return h


class GPTQResult(NamedTuple):
    Q: torch.Tensor  # (rows, cols) float32: the dequantized weight, in the original column order
    scales: torch.Tensor  # (rows, groups): grid step of each group (groups in processing order)
    zeros: torch.Tensor  # (rows, groups): integer zero point of each group
    g_idx: torch.Tensor  # (cols,) int64: group of each original column
    perm: torch.Tensor  # (cols,) int64: processing order (identity without act-order)


@contextmanager
def _few_threads(device: torch.device):
    """One CPU thread for the column loop: its ~10 tiny ops per column only lose to thread
    synchronization (measured on 2 busy cores: 0.35 ms/column on one thread, 10 ms on two)."""
    if device.type != "cpu":
        yield
        return
    with one_torch_thread():
        yield


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` (§4 step 3), from the Cholesky factor of ``H``."""
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError("GPTQ: the dampened Hessian is not positive definite; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def _as_hessian(X_or_H: torch.Tensor | Hessian, columns: int, device) -> torch.Tensor:
    """A fresh float32 copy of H: from a ``Hessian``, or from inputs ``X`` (..., columns)."""
    h = X_or_H if isinstance(X_or_H, Hessian) else hessian(X_or_H.reshape(-1, columns))
    if h.H.shape != (columns, columns):
        raise ValueError(f"Hessian is {tuple(h.H.shape)}, the weight has {columns} columns")
    return h.H.to(device, torch.float32).clone()


def gptq_quantize_linear(
    W: torch.Tensor,
    X_or_H: torch.Tensor | Hessian,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp: float = DAMP,
    block_size: int = BLOCK_SIZE,
) -> GPTQResult:
    """GPTQ (Algorithm 1) of ``W`` (rows, cols) given inputs ``X`` (tokens, cols) or their ``Hessian``.

    ``group_size <= 0`` means one grid per row. See the module docstring for every step.
    """
    check_bits(bits)
    W = W.detach().to(torch.float32).clone()  # (rows, cols), updated in place by the feedback
    columns = W.shape[1]
    H = _as_hessian(X_or_H, columns, W.device)  # (cols, cols)

    dead = torch.diag(H) == 0  # step 2
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.arange(columns, device=W.device)
    if act_order:  # step 3; stable, so equal diagonals keep their order
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(columns, device=W.device)  # step 4
    Hinv = _inverse_cholesky(H)  # step 5: (cols, cols), upper triangular

    g = group_size if group_size > 0 else columns
    B = g * max(1, block_size // g) if group_size > 0 else block_size
    Q = torch.zeros_like(W)
    grids: list[GridParams] = [] if group_size > 0 else [find_params(W, bits, sym)]
    for i1 in range(0, columns, B):  # step 7: lazy batches
        i2 = min(i1 + B, columns)
        W1 = W[:, i1:i2]  # (rows, b): a view, the block's weights as the feedback leaves them
        Hinv1 = Hinv[i1:i2, i1:i2]
        E = torch.zeros_like(W1)  # (rows, b): the block's scaled errors
        with _few_threads(W.device):
            for i in range(i2 - i1):  # step 6: the OBQ update, column by column
                if group_size > 0 and (i1 + i) % g == 0:
                    grids.append(find_params(W1[:, i:i + g], bits, sym))
                w = W1[:, i].clone()  # (rows,)
                q = quantize(w.unsqueeze(1), grids[-1]).squeeze(1)
                Q[:, i1 + i] = q
                E[:, i] = (w - q) / Hinv1[i, i]
                W1[:, i:] -= E[:, i:i + 1] * Hinv1[i:i + 1, i:]
        W[:, i2:] -= E @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    g_idx = torch.div(invperm, g, rounding_mode="floor") if group_size > 0 else torch.zeros_like(perm)
    scales = torch.cat([p.scale for p in grids], dim=1)
    zeros = torch.cat([p.zero for p in grids], dim=1)
    return GPTQResult(Q[:, invperm], scales, zeros, g_idx, perm)


def reconstruction_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor | Hessian) -> float:
    """``||WX - QX||² / n`` through ``tr(ΔW H ΔWᵀ) / 2`` with ``H = 2XXᵀ/n`` (no data pass needed)."""
    H = H.H if isinstance(H, Hessian) else H
    D = (W.to(H.device, torch.float64) - Q.to(H.device, torch.float64))  # (rows, cols)
    return float(((D @ H.to(torch.float64)) * D).sum() / 2)


# ---------------------------------------------------------------- a whole Llama model, layer by layer


class _Stop(Exception):
    pass


def _decoder_inputs(model, calib_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """The inputs (hidden states, keyword arguments) the model hands its first decoder layer, per batch."""
    captured = []

    def grab(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib_ids.split(batch_size):
            try:
                model(batch.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, inputs) -> list[tuple[torch.Tensor, dict]]:
    outs = []
    for hidden, kwargs in inputs:
        out = layer(hidden, **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outs


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _layer_hessians(layer: nn.Module, inputs) -> dict[str, Hessian]:
    """Run ``layer`` on ``inputs`` with hooks that accumulate each linear's Hessian."""
    linears = _linears(layer)
    hessians = {name: Hessian(m.in_features, m.weight.device) for name, m in linears.items()}
    handles = [m.register_forward_hook(lambda mod, args, out, h=hessians[name]: h.add(args[0]))
               for name, m in linears.items()]
    try:
        _run_layer(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def _same_input_groups(hessians: dict[str, Hessian]) -> list[list[str]]:
    """Linears that read the same input (q/k/v; gate/up) have bit-identical Hessians: group them."""
    groups: list[list[str]] = []
    for name, h in hessians.items():
        for group in groups:
            if torch.equal(hessians[group[0]].H, h.H):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _quantize_group(layer, names, h: Hessian, index, bits, group_size, sym, act_order, damp, method):
    """Quantize linears sharing one input as one matrix of stacked rows, then split it back.

    The same as one call per linear (up to float summation order in the lazy-batch product): GPTQ
    treats rows independently given H (§4: H "depends only on the layer inputs X", the same for
    every row), and grids are per row; the column loop just runs once.
    """
    linears = [layer.get_submodule(name) for name in names]
    W = torch.cat([m.weight.data for m in linears]).float()  # (sum of rows, cols)
    start = time.perf_counter()
    if method == "gptq":
        Q = gptq_quantize_linear(W, h, bits, group_size, sym, act_order, damp).Q
    else:
        Q = rtn_quantize_linear(W, bits, group_size, sym)[0]
    seconds = (time.perf_counter() - start) / len(linears)
    R = rtn_quantize_linear(W, bits, group_size, sym)[0]
    reports = []
    for m, name, q, w, r in zip(linears, names, Q.split([m.out_features for m in linears]),
                                W.split([m.out_features for m in linears]),
                                R.split([m.out_features for m in linears])):
        reports.append(LinearReport(f"model.layers.{index}.{name}", reconstruction_error(w, q, h),
                                    reconstruction_error(w, r, h), seconds))
        m.weight.data = q.to(m.weight.dtype).contiguous()
    return reports


@dataclass(frozen=True)
class LinearReport:
    name: str  # "model.layers.3.self_attn.q_proj"
    error: float  # ||WX - QX||² / n on this layer's own (sequential) calibration inputs
    rtn_error: float  # the same for round-to-nearest on the same grid options and inputs
    seconds: float  # time of the quantization itself (shared equally by linears quantized together)


@torch.no_grad()
def quantize_model(
    model,
    calib_ids: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = False,
    act_order: bool = False,
    damp: float = DAMP,
    method: str = "gptq",
    layers: list[int] | None = None,
    batch_size: int = 8,
) -> list[LinearReport]:
    """Quantize the decoder linears of a HF Llama-style ``model`` in place (weights := dequantized Q).

    Sequential, as the paper does (§4 "step 3" of the full algorithm; §5): decoder layer ``l`` sees
    the calibration tokens ``calib_ids`` (sequences, length) through layers ``0..l-1`` *already
    quantized*; each linear's Hessian comes from hooks on that pass, then all of the layer's linears
    are quantized and its outputs recomputed for layer ``l + 1``. ``method="rtn"`` rounds to nearest
    on the same grid (its reported error still uses the sequential inputs). ``layers`` restricts
    quantization to those decoder layers (the others stay dense). Embeddings and lm_head stay dense.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"method={method!r}: 'gptq' or 'rtn'")
    decoder = model.model.layers
    chosen = set(range(len(decoder)) if layers is None else layers)
    inputs = _decoder_inputs(model, calib_ids, batch_size)
    reports = []
    for index, layer in enumerate(decoder):
        if index > max(chosen, default=-1):
            break
        if index in chosen:
            hessians = _layer_hessians(layer, inputs)
            for names in _same_input_groups(hessians):
                reports += _quantize_group(layer, names, hessians[names[0]], index, bits, group_size, sym,
                                           act_order, damp, method)
        inputs = _run_layer(layer, inputs)
    return reports


@torch.no_grad()
def linear_hessians(model, calib_ids: torch.Tensor, layers: list[int], batch_size: int = 8) -> dict[str, Hessian]:
    """Hessians of every linear of decoder ``layers`` on ``model``'s own activations (one pass, no quantization).

    The common yardstick for comparing two quantized copies of a model layer by layer.
    """
    hessians: dict[str, Hessian] = {}
    handles = []
    for index in layers:
        for name, m in _linears(model.model.layers[index]).items():
            h = hessians[f"model.layers.{index}.{name}"] = Hessian(m.in_features, m.weight.device)
            handles.append(m.register_forward_hook(lambda mod, args, out, h=h: h.add(args[0])))
    try:
        for batch in calib_ids.split(batch_size):
            model(batch.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


__all__ = [
    "BLOCK_SIZE",
    "DAMP",
    "GPTQResult",
    "Hessian",
    "LinearReport",
    "gptq_quantize_linear",
    "hessian",
    "linear_hessians",
    "quantize_model",
    "reconstruction_error",
]
