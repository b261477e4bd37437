"""Speed of QLoRA steps: step time and tokens/s as noise-aware baselines, and the trainer's loop
against a bare peft + bitsandbytes loop doing the same steps (target: >= 0.97x its speed)."""

from __future__ import annotations

import statistics
import time

import pytest

from scalellm import memory, stats, train
from scalellm.baselines import Tolerance
from suites.lora.conftest import config_for

pytestmark = [pytest.mark.lora, pytest.mark.nf4, pytest.mark.throughput]

#: Step-time figures vs baseline (noise-aware rule: the whole bootstrap interval must be worse).
#: CPU: a shared 2-core machine; step times of one run spread 2x under load (measured, N=10) -> 50%.
#: GPU: dedicated card -> 10%.
STEP_TOL = {"cpu": Tolerance(rel=0.5, why="shared 2-core CI box: measured 2x spread within one run"),
            "gpu": Tolerance(rel=0.1, why="dedicated GPU; kernel-level noise only")}
#: Trainer speed / bare-loop speed. The issue's target is 0.97; on CUDA that is asserted. On a shared
#: CPU paired steps differ by tens of percent from load alone, so only a gross overhead (>25%) fails.
MIN_SPEED_RATIO = {"cpu": 0.75, "gpu": 0.97}
#: The ratio against its baseline (noise-aware rule): cpu pairs spread 0.79-1.04 under load (N=4);
#: on the H100 the median was 1.085 (N=8).
RATIO_TOL = {"cpu": Tolerance(rel=0.25, why="shared 2-core box: paired ratios spread 0.79-1.04"),
             "gpu": Tolerance(rel=0.10, why="dedicated GPU; step-level noise only")}
#: Interleaved (trainer, bare) step pairs; the first pair is warm-up and dropped.
PAIRS = 9


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


def _bare_step(model, optimizer, x, device):
    """What anyone writes with peft + bnb by hand: forward with labels, backward, step, zero."""
    memory.synchronize(device)
    start = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    memory.synchronize(device)
    return time.perf_counter() - start


def test_trainer_keeps_pace_with_bare_loop(checkpoint, device, record_metric):
    """Pairs of (trainer step, bare step) on one model and batch, interleaved so load drifts hit both."""
    cfg = config_for(device)
    base, tokenizer = train.load_base(checkpoint, cfg, device)
    model = train.add_lora(base, cfg)
    optimizer, _ = train.make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    x = train.split_data(tokenizer, cfg)[0][: cfg.batch_size]  # (batch, seq)
    ratios, trainer_s, bare_s = [], [], []
    model.train()
    for _ in range(PAIRS):
        _, (t,) = train.train_steps(model, optimizer, [x], device)
        b = _bare_step(model, optimizer, x.to(device), device)
        trainer_s.append(t)
        bare_s.append(b)
        ratios.append(b / t)  # speed ratio = trainer speed / bare speed = bare time / trainer time
    ratios, trainer_s, bare_s = ratios[1:], trainer_s[1:], bare_s[1:]
    ratio = statistics.median(ratios)
    record_metric("trainer_over_bare_speed", ratio, unit="x", better="higher",
                  tolerance=RATIO_TOL[_kind(device)],
                  samples=ratios)
    # The noise-aware rule (scalellm.stats): slower only when the whole bootstrap interval of
    # median(bare time) / median(trainer time) lies below the target.
    interval = stats.median_ratio_interval(bare_s, trainer_s)
    assert interval.high >= MIN_SPEED_RATIO[_kind(device)], (
        f"trainer/bare speed {interval.ratio:.3f}, {stats.CONFIDENCE:.0%} interval [{interval.low:.3f}, "
        f"{interval.high:.3f}] below {MIN_SPEED_RATIO[_kind(device)]}: trainer {trainer_s} s vs bare {bare_s} s")
