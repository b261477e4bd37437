"""The noise-aware rule: a planted 5% slowdown is flagged, a clean rerun is not."""

from __future__ import annotations

import numpy as np
import pytest

from scalellm import stats

#: Sample count and spread of a typical throughput case on the 2-core CI box (about 1.5% noise).
N_SAMPLES, NOISE_SD = 15, 0.015
#: The tolerance a throughput case would use: slowdowns below it are noise, not regressions.
TOLERANCE = 0.02


def timings(seed, scale=1.0):
    return scale * (1.0 + NOISE_SD * np.random.default_rng(seed).standard_normal(N_SAMPLES))


@pytest.mark.parametrize("seed", range(5))
def test_a_planted_five_percent_slowdown_is_flagged(seed):
    interval = stats.median_ratio_interval(timings(seed + 100, 1.05), timings(seed))
    assert stats.regressed(interval, "lower", TOLERANCE)


@pytest.mark.parametrize("seed", range(5))
def test_a_clean_rerun_is_not_flagged(seed):
    interval = stats.median_ratio_interval(timings(seed + 100), timings(seed))
    assert not stats.regressed(interval, "lower", TOLERANCE)


def test_higher_is_better_flags_a_drop_not_a_gain():
    base = timings(1)
    assert stats.regressed(stats.median_ratio_interval(base * 0.9, base), "higher", TOLERANCE)
    assert not stats.regressed(stats.median_ratio_interval(base * 1.1, base), "higher", TOLERANCE)


def test_the_interval_brackets_the_point_ratio():
    interval = stats.median_ratio_interval(timings(3, 1.05), timings(4))
    assert interval.low <= interval.ratio <= interval.high


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="at least 2 samples"):
        stats.median_ratio_interval([1.0], [1.0, 1.1])
