"""Speed of each library op the suite guards, as a ratio to an in-process control.

A kernel that becomes 20% slower is lost in a whole-step or whole-decode time (the model tier's
figures move by more than that with the load on a shared machine) and in a wall clock compared with
another machine. Here each op is timed against a *control* -- a torch op without bitsandbytes that
moves the same kind of data the same way (an elementwise op that allocates an output of the same size
for a dequantize, a dense float32 matrix-vector product for the 4-bit GEMV, a float32 matmul for the
int8 one) -- on one thread, in alternating order within each round. A sample is one block of rounds:
the op's fastest round over the control's fastest round (the minimum is the least-disturbed run:
load only ever adds time, as ``timeit``'s documentation says of its repeat), and the figure is the
median over blocks (lower is better), compared with the class baseline by the noise-aware rule
(README: Baselines): a change counts only when the whole 95% interval of the ratio of medians is
beyond ``RATIO_TOLERANCE``. One thread: a single core's work, which the other core's load disturbs
least, and bnb's and torch's thread pools cannot be scheduled apart. The figures are class-scoped
and apply only on the CPU model they were recorded on (``scalellm.baselines.other_cpu_model``); a
machine records its own (``scalellm check --update-baselines -- --update-levels class``).

Ops (bnb 0.50 ``bitsandbytes.functional``): ``dequantize_4bit`` of a 4096x4096 NF4 weight;
``matmul_4bit`` of one token (the GEMV of 4-bit decoding); ``int8_linear_matmul`` of 64 tokens.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from scalellm.baselines import Tolerance
from scalellm.environment import one_torch_thread

pytestmark = [pytest.mark.throughput]

SIZE, TOKENS_INT8 = 4096, 64
BLOCKS, ROUNDS_PER_BLOCK = 20, 8
#: Per op, from run medians measured on cpu (AMD EPYC with AVX512-BF16, 2 cores, bnb 0.50.2, torch
#: 2.13, 2026-12-03): N=11 runs of 12 blocks (20 now: narrower intervals), 5 quiet, 3 with another
#: process busy on one core and 3 while a whole `tox -e tests` run kept both cores busy, each compared
#: with the first quiet run by the noise-aware rule. dequantize_4bit: ratios 0.997-1.056, interval
#: lows <= 0.978; with a planted 20% slower dequantize_4bit (N=3: quiet, busy, loaded) 1.205, 1.404,
#: 1.208, lows 1.124, 1.308, 1.099. Then in pytest with 20 blocks against the recorded baseline (0.859,
#: the top of the clean runs): 7 clean runs (4 quiet, 3 beside a busy core) 0.797-0.848, all pass;
#: 6 planted runs 0.951-1.012, ratio 1.107-1.179, interval lows 1.067-1.131, all caught at 6%.
#: gemv_4bit: 0.909-1.124 (lows up to 1.063; on this CPU the GEMV does not go through
#: dequantize_4bit: the planted slowdown left it at 0.99-1.09); int8: 0.890-1.136 (lows up to 1.070):
#: 20% each, above that spread.
RATIO_TOLERANCE = {
    "dequantize_4bit-nf4": Tolerance(rel=0.06, why="N=11 runs quiet/busy/loaded: ratio 0.997-1.056, interval "
                                                  "lows <= 0.978; a planted 20% slower dequantize: ratio "
                                                  "1.107-1.179, N=6"),
    "gemv_4bit-nf4": Tolerance(rel=0.20, why="N=11 runs quiet/busy/loaded: ratio 0.909-1.124, interval lows <= 1.063"),
    "int8_linear_matmul": Tolerance(rel=0.20, why="N=11 runs quiet/busy/loaded: ratio 0.890-1.136, interval lows "
                                                 "<= 1.070"),
}


def block_ratios(op, control, blocks: int = BLOCKS, rounds: int = ROUNDS_PER_BLOCK) -> np.ndarray:
    """Per block of ``rounds``: min time(op) / min time(control), the two in alternating order, on one
    thread, after one warm-up of each."""
    ratios = []
    with one_torch_thread():
        op(), control()
        for _ in range(blocks):
            t_op, t_control = [], []
            for i in range(rounds):
                for f, times in ((op, t_op), (control, t_control))[:: 1 if i % 2 == 0 else -1]:
                    t0 = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t0)
            ratios.append(min(t_op) / min(t_control))
    return np.array(ratios)


def record(record_metric, name: str, ratios: np.ndarray) -> None:
    assert len(ratios) == BLOCKS and np.all(ratios > 0)
    record_metric(f"op_to_control:{name}", float(np.median(ratios)), unit="x", better="lower",
                  tolerance=RATIO_TOLERANCE[name], samples=ratios)


@pytest.mark.nf4
@pytest.mark.devices("cpu")
def test_dequantize_4bit_speed_relative_to_a_memory_bound_control(device, bnb, record_metric):
    import torch

    F = bnb.F
    w = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    a, b = torch.randn(SIZE, SIZE), torch.randn(SIZE, SIZE)
    record(record_metric, "dequantize_4bit-nf4", block_ratios(lambda: F.dequantize_4bit(packed, state),
                                                              lambda: torch.add(a, b)))


@pytest.mark.nf4
@pytest.mark.devices("cpu")
def test_gemv_4bit_speed_relative_to_a_dense_matrix_vector_product(device, bnb, record_metric):
    import torch

    w = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    x = torch.randn(1, SIZE)
    with torch.no_grad():
        record(record_metric, "gemv_4bit-nf4", block_ratios(lambda: bnb.bnb.matmul_4bit(x, packed.t(), state),
                                                            lambda: torch.mv(w, x[0])))


@pytest.mark.int8
@pytest.mark.devices("cpu")
def test_int8_matmul_speed_relative_to_a_float32_matmul(device, bnb, record_metric):
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (TOKENS_INT8, SIZE), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (SIZE, SIZE), generator=g, dtype=torch.int8)
    af, bf = a.float(), b.float()
    record(record_metric, "int8_linear_matmul", block_ratios(lambda: bnb.F.int8_linear_matmul(a, b),
                                                             lambda: af @ bf.t()))
