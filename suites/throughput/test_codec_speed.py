"""Speed of the reference 4-bit quantizer against bitsandbytes' CPU quantize_4bit.

Target (the project's speed goal, README: tiers): the numpy reference quantizes at >= 1.0x bnb's CPU
speed. That is a speed goal, checked by baselines, not a wall-clock assert: the ratio
bnb_time / reference_time is recorded from paired samples (each round times the reference then bnb on
the same input, so load on the shared machine hits both alike) and compared with the stored baseline
by the noise-aware rule.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from scalellm.baselines import Tolerance
from scalellm.quant import quantize_4bit

pytestmark = [pytest.mark.throughput, pytest.mark.nf4, pytest.mark.reference]

SHAPE = (4096, 4096)  # the figure: 4096x4096 float32
BLOCKSIZE = 64  # QLoRA's default
ROUNDS = 7  # the brief: ~7 repeats each; ~5 s in all on 2 cores
# The ratio moves with machine load and CPU code path. 10 %: the 95 % bootstrap interval of the
# median of 7 paired samples must lie wholly beyond it to count as a regression (README's rule).
RATIO_TOLERANCE = Tolerance(rel=0.5, why="the ratio moved 2.2x (quiet) to 3.1x (loaded) on this 2-core box; "
                                         "the issue's goal is >= 1.0x, CI interval decides")
SECONDS_TOLERANCE = Tolerance(rel=0.10, why="wall clock on shared cores; CI interval decides")


@pytest.mark.devices("cpu")
def test_reference_quantize_speed_relative_to_bnb(device, bnb, record_metric):
    import torch

    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    bnb.F.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4")  # warm up bnb's dispatch
    quantize_4bit(x, "nf4", BLOCKSIZE)  # and the reference's lookup tables
    reference, library = [], []

    def one_round():
        t0 = time.perf_counter()
        quantize_4bit(x, "nf4", BLOCKSIZE)
        t1 = time.perf_counter()
        bnb.F.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4")
        t2 = time.perf_counter()
        reference.append(t1 - t0)
        library.append(t2 - t1)

    # A plain loop, not pytest-benchmark: its fixture runs once when xdist is active (scalellm check's
    # crash isolation), and these paired samples are what the rule compares.
    for _ in range(ROUNDS):
        one_round()
    ratios = np.array(library) / np.array(reference)  # > 1: the reference is faster
    assert len(ratios) == ROUNDS and np.all(ratios > 0)
    record_metric("speed_ratio_vs_bnb", float(np.median(ratios)), unit="x", better="higher",
                  tolerance=RATIO_TOLERANCE, samples=ratios)
    record_metric("reference_seconds", float(np.median(reference)), unit="s", better="lower",
                  tolerance=SECONDS_TOLERANCE, samples=reference)
    record_metric("bnb_seconds", float(np.median(library)), unit="s", better="lower",
                  tolerance=SECONDS_TOLERANCE, samples=library)
