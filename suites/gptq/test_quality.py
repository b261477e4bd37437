"""GPTQ on the real model against round-to-nearest at the same bits and group size.

The decoder linears of the fp32 checkpoint (every linear of ``QUANT_LAYERS``: five layers of 30,
for CPU time; see the conftest) are quantized by the reference (``scalellm.quant.gptq``;
symmetric, group 128, no act-order: transformers ``GPTQConfig``'s defaults, damp 1 % as the paper)
on the calibration tokens, layer by layer; the dequantized model is compared with fp32 on the
evaluation corpus (``scalellm.quality.compare``: perplexity, mean KLD, top-1 agreement). The rows
are recorded under the cross-method table's names (``perplexity:gptq-4bit-g128``, ...).
"""

from __future__ import annotations

import pytest

from scalellm.baselines import Tolerance
from suites.helpers.gptq_cases import Spec
from suites.helpers.bounds import GPTQ_QUALITY_TOL
from suites.helpers.quality_rows import record_quality_rows

pytestmark = [pytest.mark.gptq, pytest.mark.quality]

GPTQ_4 = Spec("gptq", 4)
RTN_4 = Spec("rtn", 4)
#: Rows of the cross-method table. 3-bit: the paper's hard case; 8-bit: the near-lossless end.
#: The extra GPTQ runs cost ~40 s of CPU each on 2 cores (a calibration pass per layer): ``slow``.
ROWS = [pytest.param(s, id=s.name) for s in (GPTQ_4, RTN_4, Spec("rtn", 3))] + [
    pytest.param(s, id=s.name, marks=pytest.mark.slow) for s in (Spec("gptq", 3), Spec("gptq", 8))]

#: Share of the model's linears on which GPTQ's layer error (on the sequential calibration inputs)
#: must be below RTN's. Measured (cpu, 4-bit g128): every one of the 35 linears (summed error
#: ratio 0.14). 95 % leaves room
#: for a layer whose Hessian is close to diagonal, where the two coincide.
MIN_SHARE_LINEARS_GPTQ_WINS = 0.95

RATIO_TOL = Tolerance(rel=0.05, why="deterministic on a device; ratio of two figures each within ~2%")


def test_gptq_beats_rtn_in_perplexity(device, real_runs):
    gptq, rtn = real_runs.run(device, GPTQ_4).quality, real_runs.run(device, RTN_4).quality
    assert gptq.perplexity < rtn.perplexity, f"GPTQ {gptq.perplexity:.3f} vs RTN {rtn.perplexity:.3f}"


def test_gptq_beats_rtn_in_kld(device, real_runs):
    gptq, rtn = real_runs.run(device, GPTQ_4).quality, real_runs.run(device, RTN_4).quality
    assert gptq.kld_mean < rtn.kld_mean, f"GPTQ {gptq.kld_mean:.4f} vs RTN {rtn.kld_mean:.4f}"


def test_gptq_layer_error_below_rtn_on_the_real_model(device, real_runs, record_metric):
    """Per linear, on the inputs GPTQ saw (the already-quantized earlier layers'): GPTQ < RTN."""
    reports = real_runs.run(device, GPTQ_4).reports
    wins = [r.error < r.rtn_error for r in reports]
    share = sum(wins) / len(wins)
    total = sum(r.error for r in reports) / sum(r.rtn_error for r in reports)
    record_metric("gptq_over_rtn_layer_error_sum:gptq-4bit-g128", total, unit="ratio", better="lower",
                  tolerance=RATIO_TOL)
    worst = max(reports, key=lambda r: r.error / r.rtn_error)
    assert share >= MIN_SHARE_LINEARS_GPTQ_WINS, (
        f"GPTQ below RTN on {share:.1%} of {len(reports)} linears; worst {worst.name}: "
        f"{worst.error:.4g} vs {worst.rtn_error:.4g}")


@pytest.mark.parametrize("spec", ROWS)
def test_cross_method_rows(device, spec, real_runs, record_metric):
    """Perplexity, mean KLD and top-1 agreement against fp32, stored as baselines (the table's rows)."""
    q = real_runs.run(device, spec).quality
    record_quality_rows(record_metric, spec.name, q, **GPTQ_QUALITY_TOL)
    assert q.perplexity >= q.reference_perplexity * 0.9 and q.kld_mean > 0
