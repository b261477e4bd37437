"""Speed of each library op the suite guards, as a ratio to an in-process control.

A kernel that becomes 20% slower is lost in a whole-step or whole-decode time (the model tier's
figures move by more than that with the load on a shared machine) and in a wall clock compared with
another machine. Here each op is timed against a *control* -- a torch op without bitsandbytes that
moves the same kind of data the same way (memory-bound elementwise work for a dequantize, a dense
float32 matrix-vector product for the 4-bit GEMV, a float32 matmul for the int8 one) -- in
alternating order within each round, so load, clock and memory bandwidth hit both alike; the figure
is the per-round ratio op / control (lower is better), stored as samples and compared with the
class baseline by the noise-aware rule (README: Baselines): a change counts only when the whole 95%
interval of the ratio of medians is beyond ``RATIO_TOLERANCE``. The figures are class-scoped: a
machine records its own (``scalellm check --update-baselines -- --update-levels class``).

Ops (bnb 0.50 ``bitsandbytes.functional``): ``dequantize_4bit`` of a 4096x4096 NF4 weight;
``matmul_4bit`` of one token (the GEMV of 4-bit decoding); ``int8_linear_matmul`` of 64 tokens.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from scalellm.baselines import Tolerance

pytestmark = [pytest.mark.throughput]

SIZE, TOKENS_INT8 = 4096, 64
ROUNDS = 15
#: Per op: twice the spread of run medians measured on cpu (AMD EPYC AVX2 VM, 2 cores, bnb 0.50.2,
#: torch 2.13, 2026-12-03, N=5 runs of this module while a CI run kept both cores busy), at least 10%.
#: dequantize_4bit 3.72-6.35 (the control tracks it badly under load: its threads and bnb's are
#: scheduled apart); gemv_4bit 17.4-18.3 (on a CPU without AVX512-BF16 bnb 0.50 computes it as
#: dequantize + matmul, so a slower dequantize shows here too); int8_linear_matmul 1.89-2.17.
RATIO_TOLERANCE = {
    "dequantize_4bit-nf4": Tolerance(rel=0.75, why="run medians 3.72-6.35 over 5 busy runs (cpu, AMD EPYC AVX2)"),
    "gemv_4bit-nf4": Tolerance(rel=0.10, why="run medians 17.4-18.3 over 5 busy runs (cpu, AMD EPYC AVX2)"),
    "int8_linear_matmul": Tolerance(rel=0.30, why="run medians 1.89-2.17 over 5 busy runs (cpu, AMD EPYC AVX2)"),
}


def paired_ratios(op, control, rounds: int = ROUNDS) -> np.ndarray:
    """Per-round ``time(op) / time(control)``, the two in alternating order, after one warm-up of each."""
    op(), control()
    ratios = []
    for i in range(rounds):
        first, second = (op, control) if i % 2 == 0 else (control, op)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        t_op, t_control = (t1 - t0, t2 - t1) if first is op else (t2 - t1, t1 - t0)
        ratios.append(t_op / t_control)
    return np.array(ratios)


def record(record_metric, name: str, ratios: np.ndarray) -> None:
    assert len(ratios) == ROUNDS and np.all(ratios > 0)
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
    out = torch.empty(SIZE, SIZE)
    record(record_metric, "dequantize_4bit-nf4", paired_ratios(lambda: F.dequantize_4bit(packed, state),
                                                               lambda: torch.add(a, b, out=out)))


@pytest.mark.nf4
@pytest.mark.devices("cpu")
def test_gemv_4bit_speed_relative_to_a_dense_matrix_vector_product(device, bnb, record_metric):
    import torch

    w = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    x = torch.randn(1, SIZE)
    with torch.no_grad():
        record(record_metric, "gemv_4bit-nf4", paired_ratios(lambda: bnb.bnb.matmul_4bit(x, packed.t(), state),
                                                             lambda: torch.mv(w, x[0])))


@pytest.mark.int8
@pytest.mark.devices("cpu")
def test_int8_matmul_speed_relative_to_a_float32_matmul(device, bnb, record_metric):
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (TOKENS_INT8, SIZE), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (SIZE, SIZE), generator=g, dtype=torch.int8)
    af, bf = a.float(), b.float()
    record(record_metric, "int8_linear_matmul", paired_ratios(lambda: bnb.F.int8_linear_matmul(a, b),
                                                              lambda: af @ bf.t()))
