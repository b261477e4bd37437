"""Speed of QLoRA steps: step time and tokens/s as noise-aware baselines.

(A "trainer against a bare loop" ratio stood here until 2026-12-03; the trainer's loop,
``scalellm.train.train_steps``, *is* the bare peft + bitsandbytes loop, so it compared the loop with a
copy of itself and proved nothing. It was dropped rather than kept as a figure that cannot move.)"""

from __future__ import annotations

import statistics

import pytest

from scalellm.baselines import Tolerance

pytestmark = [pytest.mark.lora, pytest.mark.nf4, pytest.mark.throughput]

#: Step-time figures vs baseline (noise-aware rule: the whole bootstrap interval must be worse).
#: CPU: a shared 2-core machine; step times of one run spread 2x under load (measured, N=10) -> 50%.
#: GPU: dedicated card -> 10%.
STEP_TOL = {"cpu": Tolerance(rel=0.5, why="shared 2-core CI box: measured 2x spread within one run"),
            "gpu": Tolerance(rel=0.1, why="dedicated GPU; kernel-level noise only")}


def _kind(device):
    return "cpu" if device == "cpu" else "gpu"


def test_step_time_and_tokens_per_second(trained, device, record_metric):
    _, _, result = trained
    steps = result.step_seconds[1:]  # the first step pays one-off costs (allocations, kernel choice)
    tol = STEP_TOL[_kind(device)]
    record_metric("step_time", statistics.median(steps), unit="s", better="lower", tolerance=tol, samples=steps)
    tps = [result.tokens_per_step / s for s in steps]
    record_metric("tokens_per_s", statistics.median(tps), unit="tok/s", better="higher", tolerance=tol, samples=tps)
    assert all(s > 0 for s in steps)
