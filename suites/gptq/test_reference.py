"""The reference GPTQ (``scalellm.quant.gptq``) on random layers: what Frantar et al. 2022 claim of it.

* On correlated inputs GPTQ's layer error ``||WX - QX||²`` is below round-to-nearest's on the same
  grid (2/3/4/8 bits, symmetric and asymmetric, act-order on and off) — the paper's Table 1 claim.
* With a diagonal Hessian (uncorrelated inputs) no error is fed back: GPTQ *is* RTN, exactly
  (with act-order: RTN over the permuted columns, groups formed in that order).
* Every quantized group holds at most ``2**bits`` levels of its own grid; ``g_idx`` / ``perm``
  describe the groups; dead inputs get zero weights; the lazy batch equals the unbatched update.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scalellm.baselines import Tolerance
from scalellm.quant.gptq import Hessian, gptq_quantize_linear, hessian, reconstruction_error
from scalellm.quant.rtn import rtn_quantize_linear

pytestmark = [pytest.mark.gptq, pytest.mark.reference]

ROWS, COLUMNS, TOKENS = 48, 256, 1024  # 2 lazy blocks of 128 columns; 4 groups of 64
GROUP = 64
BITS = [pytest.param(b, id=f"{b}bit") for b in (2, 3, 4, 8)]
SYM = [pytest.param(s, id="sym" if s else "asym") for s in (True, False)]
ACT = [pytest.param(a, id="act" if a else "noact") for a in (False, True)]

#: GPTQ / RTN error ratio on the correlated seeded layer must stay below this. Measured (cpu, seed 0,
#: all 16 bits x sym x act-order cases): 0.31-0.69 (2-bit highest); the paper's Table 1-3 gaps at 3-4 bits are of the
#: same order. 0.8 leaves room for device summation order and only fails if the feedback is broken
#: (no feedback gives exactly 1.0, see test_diagonal_hessian_gives_rtn).
MAX_GPTQ_OVER_RTN = 0.8
#: Figures recorded from the seeded layer are deterministic on a device; 2 % covers another BLAS.
RATIO_TOL = Tolerance(rel=0.02, why="seeded layer; deterministic on a device; 2% for BLAS summation order")
#: Lazy batch (B = 128) vs the unbatched update (B = 1): the same arithmetic in another order, so
#: a rounding decision near a tie can flip (and a flip feeds back into later columns). Allow 0.5 %
#: of entries on another grid point and 1e-3 relative error. Measured (cpu, seed 0, 4 cases and the
#: row-stacking case): 0 flips, error ratio within 4e-8.
MAX_LAZY_DIFF_SHARE = 0.005
LAZY_ERROR_RTOL = 1e-3
#: Off-the-grid slack for (Q / scale + zero): float32 division of a product, a few ulps of maxq=255.
GRID_ATOL = 1e-3


def correlated_layer(device: str, seed: int = 0, rows: int = ROWS, columns: int = COLUMNS, tokens: int = TOKENS):
    """Seeded ``W`` (rows, cols) ~ N(0, 1) and inputs ``X`` (tokens, cols) with strongly correlated
    columns (a random mixing matrix, as LLM activations are) plus a few high-energy channels."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=gen)
    mix = torch.randn(columns, columns, generator=gen) / columns**0.5
    X = torch.randn(tokens, columns, generator=gen) @ mix + 0.1 * torch.randn(tokens, columns, generator=gen)
    X[:, ::32] *= 5  # outlier input channels (LLM.int8 §3)
    return W.to(device), X.to(device)


def layer_error(W, Q, X) -> float:
    """``||WX - QX||²`` computed directly (not through the Hessian)."""
    return float(((W - Q).double() @ X.double().T).pow(2).sum())


def identity_hessian(columns: int, device: str, diagonal: torch.Tensor | None = None) -> Hessian:
    h = Hessian(columns, device)
    h.H = torch.diag(diagonal.to(device)) if diagonal is not None else torch.eye(columns, device=device)
    h.n = 1
    return h


@pytest.mark.parametrize("act_order", ACT)
@pytest.mark.parametrize("sym", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_gptq_error_below_rtn_on_correlated_inputs(device, bits, sym, act_order, record_metric):
    W, X = correlated_layer(device)
    Q = gptq_quantize_linear(W, X, bits, GROUP, sym, act_order).Q
    R = rtn_quantize_linear(W, bits, GROUP, sym)[0]
    ratio = layer_error(W, Q, X) / layer_error(W, R, X)
    record_metric("gptq_over_rtn_layer_error", ratio, unit="ratio", better="lower", tolerance=RATIO_TOL)
    assert ratio < MAX_GPTQ_OVER_RTN, f"{bits}-bit sym={sym} act_order={act_order}: GPTQ/RTN = {ratio:.3f}"


@pytest.mark.parametrize("sym", SYM)
@pytest.mark.parametrize("bits", BITS)
def test_identity_hessian_gives_rtn_exactly(device, bits, sym):
    """H = I (uncorrelated unit inputs): every [H⁻¹]_{i, j>i} is 0, so Q, scales and zeros are RTN's."""
    W, _ = correlated_layer(device)
    for act_order in (False, True):  # a constant diagonal: the stable act-order sort is the identity
        got = gptq_quantize_linear(W, identity_hessian(COLUMNS, device), bits, GROUP, sym, act_order)
        Q, scales, zeros = rtn_quantize_linear(W, bits, GROUP, sym)
        assert torch.equal(got.Q, Q), f"act_order={act_order}: max |Q - RTN| = {(got.Q - Q).abs().max():.3g}"
        assert torch.equal(got.scales, scales) and torch.equal(got.zeros, zeros)
        assert torch.equal(got.perm.cpu(), torch.arange(COLUMNS))


@pytest.mark.parametrize("bits", BITS)
def test_diagonal_hessian_with_act_order_is_rtn_over_permuted_columns(device, bits):
    """A non-constant diagonal H: act-order sorts by it, groups are formed in that order, no feedback."""
    W, _ = correlated_layer(device)
    diagonal = torch.rand(COLUMNS, generator=torch.Generator().manual_seed(1)) + 0.5
    got = gptq_quantize_linear(W, identity_hessian(COLUMNS, device, diagonal), bits, GROUP, False, True)
    assert torch.equal(got.perm.cpu(), torch.argsort(diagonal, descending=True, stable=True))
    R = rtn_quantize_linear(W[:, got.perm], bits, GROUP, False)[0]
    assert torch.equal(got.Q[:, got.perm], R)


def test_uncorrelated_inputs_give_nearly_rtn(device):
    """Finite samples of i.i.d. inputs: H = I + O(1/sqrt(n)) off the diagonal, so GPTQ ~ RTN."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(ROWS, COLUMNS, generator=gen).to(device)
    X = torch.randn(64 * COLUMNS, COLUMNS, generator=gen).to(device)
    ratio = layer_error(W, gptq_quantize_linear(W, X, 4, GROUP).Q, X) / layer_error(W, rtn_quantize_linear(W, 4, GROUP)[0], X)
    # Off-diagonal H entries ~ 1/sqrt(16384) = 0.008: the feedback can win little. Measured (cpu): 0.993.
    assert 0.9 < ratio <= 1.0 + 1e-6, ratio


def assert_on_grid(result, bits: int, group_size: int) -> None:
    """Each group's values are ``scale * (q - zero)`` with integer ``q`` in [0, 2**bits - 1]."""
    __tracebackhide__ = True
    maxq = 2**bits - 1
    scale = result.scales[:, result.g_idx]  # (rows, cols): each column's own group's grid
    zero = result.zeros[:, result.g_idx]
    q = result.Q / scale + zero
    off = (q - q.round()).abs().max().item()
    assert off < GRID_ATOL, f"{bits}-bit g{group_size}: a value lies {off:.3g} steps off its grid"
    assert q.round().min() >= 0 and q.round().max() <= maxq
    for j in range(result.scales.shape[1]):
        levels = torch.unique(q[:, result.g_idx == j].round(), dim=None).numel()
        assert levels <= 2**bits, f"group {j} has {levels} levels"


@given(
    rows=st.integers(1, 12),
    columns=st.integers(1, 80),
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([-1, 8, 16, 32]),
    sym=st.booleans(),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_values_lie_on_each_groups_grid(device, rows, columns, bits, group_size, sym, act_order, seed):
    W, X = correlated_layer(device, seed, rows, columns, tokens=2 * columns + 8)
    result = gptq_quantize_linear(W, X, bits, group_size, sym, act_order, block_size=16)
    assert_on_grid(result, bits, group_size)


@pytest.mark.parametrize("act_order", ACT)
def test_g_idx_and_perm_describe_the_groups(device, act_order):
    W, X = correlated_layer(device)
    result = gptq_quantize_linear(W, X, 4, GROUP, act_order=act_order)
    perm, g_idx = result.perm.cpu(), result.g_idx.cpu()
    assert torch.equal(torch.sort(perm).values, torch.arange(COLUMNS))
    if act_order:
        diag = torch.diag(hessian(X).H).cpu()
        assert (diag[perm][:-1] >= diag[perm][1:]).all(), "act-order: columns not by decreasing diag(H)"
    else:
        assert torch.equal(perm, torch.arange(COLUMNS))
    # the j-th group is the j-th run of GROUP columns in processing order
    assert torch.equal(g_idx[perm], torch.arange(COLUMNS) // GROUP)
    assert result.scales.shape == result.zeros.shape == (ROWS, COLUMNS // GROUP)


@pytest.mark.parametrize("act_order", ACT)
def test_dead_columns_get_zero_weights(device, act_order):
    """Inputs that are always 0 (H_ii = 0): weights 0, no NaN, the live columns still beat RTN."""
    W, X = correlated_layer(device)
    dead = torch.zeros(COLUMNS, dtype=torch.bool)
    dead[[0, 5, 77, 200]] = True
    X[:, dead.to(device)] = 0
    result = gptq_quantize_linear(W, X, 4, GROUP, act_order=act_order)
    assert torch.isfinite(result.Q).all()
    assert (result.Q[:, dead.to(device)] == 0).all()
    rtn = rtn_quantize_linear(W, 4, GROUP)[0]
    assert layer_error(W, result.Q, X) < layer_error(W, rtn, X)


def grid_point_flips(a, b, result) -> float:
    """Share of entries of two quantizations of one weight that sit on different grid points (more
    than half a step apart); a grid fitted to float-different weights moves all entries by ulps."""
    step = result.scales[:, result.g_idx]  # (rows, cols)
    return ((a - b).abs() > step / 2).float().mean().item()


@pytest.mark.parametrize("group_size", [-1, GROUP])
@pytest.mark.parametrize("bits", [3, 4])
def test_lazy_batch_equals_column_by_column(device, bits, group_size):
    """§4 step 2: deferring the feedback to block ends changes the order of the arithmetic, not its result."""
    W, X = correlated_layer(device)
    h = hessian(X)
    result = gptq_quantize_linear(W, h, bits, group_size, block_size=128)
    lazy = result.Q
    eager = gptq_quantize_linear(W, h, bits, group_size, block_size=1).Q  # (groups round it up to g)
    share = grid_point_flips(lazy, eager, result)
    assert share <= MAX_LAZY_DIFF_SHARE, f"{share:.2%} of entries on another grid point"
    e_lazy, e_eager = reconstruction_error(W, lazy, h), reconstruction_error(W, eager, h)
    assert abs(e_lazy - e_eager) <= LAZY_ERROR_RTOL * e_eager


def test_hessian_accumulates_over_batches(device):
    """H = 2XXᵀ/n whether X arrives at once or in uneven batches."""
    _, X = correlated_layer(device)
    running = Hessian(COLUMNS, device)
    for batch in X.split([1, 100, 500, 423]):
        running.add(batch)
    direct = 2 * X.double().T @ X.double() / X.shape[0]
    assert running.n == TOKENS
    torch.testing.assert_close(running.H.double(), direct, rtol=1e-4, atol=1e-4 * direct.diag().mean().item())


def test_reconstruction_error_equals_the_direct_product(device):
    W, X = correlated_layer(device)
    Q = rtn_quantize_linear(W, 3, GROUP)[0]
    via_h = reconstruction_error(W, Q, hessian(X))
    direct = layer_error(W, Q, X) / TOKENS
    assert abs(via_h - direct) <= 1e-4 * direct


def test_rows_are_quantized_independently(device):
    """Stacking two weights that read the same input (q/k/v in quantize_model) changes no row."""
    W, X = correlated_layer(device)
    h = hessian(X)
    stacked = gptq_quantize_linear(W, h, 4, GROUP).Q
    apart = torch.cat([gptq_quantize_linear(part, h, 4, GROUP).Q for part in W.split([16, ROWS - 16])])
    share = grid_point_flips(stacked, apart, gptq_quantize_linear(W, h, 4, GROUP))
    assert share <= MAX_LAZY_DIFF_SHARE, f"{share:.2%} of entries on another grid point"
