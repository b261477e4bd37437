"""The noise-aware rule for repeated measurements (throughput, step time).

One sample of a timing says little: a 2-core CI box or a shared GPU moves by several percent from
run to run. Figures measured as repeated samples are compared by the ratio of medians, run over
baseline, with a bootstrap confidence interval; a regression is declared only when the whole
interval lies beyond the tolerance (Efron & Tibshirani, *An Introduction to the Bootstrap*, ch. 13,
percentile interval).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Resamples and confidence level of the interval; the seed makes a verdict repeatable.
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0


@dataclass(frozen=True)
class RatioInterval:
    ratio: float  # median(run) / median(baseline)
    low: float
    high: float


def median_ratio_interval(run, baseline, *, resamples: int = BOOTSTRAP_RESAMPLES,
                          confidence: float = CONFIDENCE, seed: int = SEED) -> RatioInterval:
    """Percentile bootstrap interval of median(run) / median(baseline)."""
    run = np.asarray(run, dtype=np.float64)
    baseline = np.asarray(baseline, dtype=np.float64)
    if run.size < 2 or baseline.size < 2:
        raise ValueError(f"need at least 2 samples on each side, got {run.size} and {baseline.size}")
    rng = np.random.default_rng(seed)
    run_medians = np.median(rng.choice(run, size=(resamples, run.size)), axis=1)
    base_medians = np.median(rng.choice(baseline, size=(resamples, baseline.size)), axis=1)
    ratios = run_medians / base_medians
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [alpha, 1.0 - alpha])
    return RatioInterval(float(np.median(run) / np.median(baseline)), float(low), float(high))


def regressed(interval: RatioInterval, better: str, rel_tolerance: float) -> bool:
    """True when the whole interval is worse than the tolerance allows.

    ``better="higher"`` (tokens/s): worse means the ratio falls below 1 - tol.
    ``better="lower"`` (seconds, bytes): worse means the ratio rises above 1 + tol.
    ``better="equal"``: either side.
    """
    too_low = interval.high < 1.0 - rel_tolerance
    too_high = interval.low > 1.0 + rel_tolerance
    if better == "higher":
        return too_low
    if better == "lower":
        return too_high
    return too_low or too_high
