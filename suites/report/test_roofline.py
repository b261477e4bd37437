"""Roofline: copy bandwidth and bf16 matmul rate on each device, and the decode bound arithmetic."""

from __future__ import annotations

import pytest

from scalellm import roofline
from scalellm.baselines import Tolerance

pytestmark = [pytest.mark.throughput]

#: A shared 2-core CI box moves bandwidth and FLOP rates by tens of percent between runs; the noise-
#: aware rule (bootstrap CI of the median ratio) decides, with this tolerance, on the samples.
SPEED_TOLERANCE = Tolerance(rel=0.5, why="shared 2-core CPU boxes: copy and matmul rates swing by tens of %")
#: Plausibility floor: any device this suite runs on copies faster than 0.5 GB/s and multiplies
#: faster than 1 GFLOP/s (a 2015 laptop core does both several times over).
MIN_BANDWIDTH, MIN_FLOPS = 0.5e9, 1e9


def test_copy_bandwidth_and_matmul_rate_are_measured(device, record_metric):
    roof = roofline.measure(device)
    assert roof.copy_bytes_per_s > MIN_BANDWIDTH
    assert roof.matmul_flops_per_s > MIN_FLOPS
    record_metric("copy_GB_s", roof.copy_bytes_per_s / 1e9, unit="GB/s", better="higher",
                  tolerance=SPEED_TOLERANCE, samples=[s / 1e9 for s in roof.copy_samples])
    record_metric("bf16_matmul_GFLOP_s", roof.matmul_flops_per_s / 1e9, unit="GFLOP/s", better="higher",
                  tolerance=SPEED_TOLERANCE, samples=[s / 1e9 for s in roof.matmul_samples])


def test_measure_runs_once_per_device():
    assert roofline.measure("cpu") is roofline.measure("cpu")


def test_decode_bound_of_llama2_7b_bf16_at_3_tb_s():
    # 6,738,415,616 parameters x 2 bytes read per token; 3e12 B/s -> about 222.6 tokens/s
    per_token = roofline.plan_bytes_per_token("llama-2-7b", "bf16", context=0)
    assert per_token == 6_738_415_616 * 2
    assert roofline.decode_bound(per_token, 3e12) == pytest.approx(3e12 / (6_738_415_616 * 2))


def test_the_kv_cache_adds_to_the_bytes_per_token():
    # llama-2-7b: 2 x 32 layers x 4096 (32 heads x 128) x 2 bytes = 512 KiB of cache per token of context
    without = roofline.plan_bytes_per_token("llama-2-7b", "bf16", context=0)
    with_ctx = roofline.plan_bytes_per_token("llama-2-7b", "bf16", context=1024)
    assert with_ctx - without == 1024 * 2 * 32 * 4096 * 2


def test_batching_shares_the_weight_reads():
    assert roofline.decode_bytes_per_token(1000, 0, 0, batch=4) == 250


def test_fraction_of_bound():
    assert roofline.fraction_of_bound(50.0, 1e9, 1e11) == pytest.approx(0.5)


def test_a_zero_bandwidth_is_refused():
    with pytest.raises(ValueError, match="positive"):
        roofline.decode_bound(1e9, 0.0)
