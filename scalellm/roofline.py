"""Roofline of a device: copy bandwidth and bf16 matmul rate, and the decode bound they imply.

Decoding one token at small batch reads every weight once (and the KV cache of the context so
far), so its speed is bounded by memory bandwidth (Williams, Waterman & Patterson 2009, "Roofline:
an insightful visual performance model"; the memory-bound regime):

    tokens/s  <=  bandwidth / bytes read per token

:func:`measure` times a device-to-device copy and a square bf16 matrix product once per process
(cached); :func:`decode_bound` turns bytes per token into that ceiling, and
:func:`fraction_of_bound` reports a measured decode speed as a share of it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

#: Copy size and matrix size per device: large enough to leave the caches and launch overheads
#: behind on a GPU, small enough to take well under a second on a 2-core CPU.
COPY_BYTES = {"cuda": 1 << 30, "mps": 256 << 20, "cpu": 64 << 20}
MATMUL_N = {"cuda": 8192, "mps": 4096, "cpu": 512}
#: Timed repetitions after one warm-up; the median is reported.
REPEATS = 5


@dataclass(frozen=True)
class Roofline:
    device: str
    copy_bytes_per_s: float  # bytes read + bytes written per second by a tensor copy
    matmul_flops_per_s: float  # 2 n^3 / time of an n x n x n bf16 product
    copy_samples: tuple[float, ...]
    matmul_samples: tuple[float, ...]

    def to_json(self) -> dict:
        return asdict(self)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _timed(fn, device: str, repeats: int = REPEATS) -> list[float]:
    fn()  # warm-up: kernel selection, allocator
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(device: str, nbytes: int | None = None) -> list[float]:
    """Samples of copy bandwidth in bytes/s, counting the bytes read and the bytes written."""
    import torch

    nbytes = nbytes or COPY_BYTES[device.split(":")[0]]
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)  # (nbytes,)
    dst = torch.empty_like(src)
    times = _timed(lambda: dst.copy_(src), device)
    return [2 * nbytes / t for t in times]


def matmul_rate(device: str, n: int | None = None) -> list[float]:
    """Samples of bf16 matrix-product throughput in FLOP/s (2 n^3 per product)."""
    import torch

    n = n or MATMUL_N[device.split(":")[0]]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)  # (n, n)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    out = torch.empty_like(a)
    times = _timed(lambda: torch.matmul(a, b, out=out), device)
    return [2 * n**3 / t for t in times]


@lru_cache(maxsize=None)
def measure(device: str) -> Roofline:
    """The device's roofline, measured once per process and device."""
    copies = copy_bandwidth(device)
    products = matmul_rate(device)
    return Roofline(device, statistics.median(copies), statistics.median(products),
                    tuple(copies), tuple(products))


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_token: int = 0, context: int = 0,
                           batch: int = 1) -> float:
    """Bytes read to decode one token per sequence: all weights once per step (shared by the
    batch), plus each sequence's KV cache of ``context`` tokens; divided by the batch."""
    return (weight_bytes + batch * kv_bytes_per_token * context) / batch


def decode_bound(bytes_per_token: float, bandwidth: float) -> float:
    """The bandwidth ceiling on decode speed, tokens/s."""
    if bytes_per_token <= 0 or bandwidth <= 0:
        raise ValueError(f"need positive bytes per token and bandwidth, got {bytes_per_token} and {bandwidth}")
    return bandwidth / bytes_per_token


def fraction_of_bound(tokens_per_s: float, bytes_per_token: float, bandwidth: float) -> float:
    """A measured decode speed as a share of its bandwidth ceiling (1.0 = at the roof)."""
    return tokens_per_s / decode_bound(bytes_per_token, bandwidth)


def plan_bytes_per_token(model: str, method: str, context: int, batch: int = 1) -> float:
    """Bytes per decoded token for a planner model/method: weights and quantization constants,
    plus the KV cache of ``context`` tokens (as :mod:`scalellm.planner` sizes them)."""
    from scalellm import planner

    p = planner.plan(model, planner.Setting(method, "inference", seq=max(context, 1), batch=batch))
    weights = p.parts["weights"] + p.parts["quantization constants"]
    kv_per_token = p.parts["KV cache"] / (max(context, 1) * batch) if context else 0
    return decode_bytes_per_token(weights, int(kv_per_token), context, batch)
