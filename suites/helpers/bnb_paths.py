"""Which CPU code path bitsandbytes takes here, asked the way bitsandbytes itself decides.

bitsandbytes' CPU backend (``bitsandbytes/backends/cpu/ops.py``, 0.50) picks its kernels from the
processor: the native 4-bit dequantize runs its AVX512 implementation where
``torch.backends.cpu.get_cpu_capability() == "AVX512"`` (its ``_has_avx512``), and ``Linear4bit``
repacks its weights for the AVX512-BF16 GEMM where ``bitsandbytes.functional.has_avx512bf16()``.
A library bug that lives on one of those paths is a strict xfail conditioned on that path: it stays
strict where the bug lives and cannot XPASS on a machine that takes another path.
"""

from __future__ import annotations


def dequantize_4bit_takes_avx512() -> bool:
    """bnb's own ``_has_avx512`` (the AVX512 native 4-bit dequantize), False without bnb's native library."""
    try:
        from bitsandbytes.backends.cpu import ops
    except Exception:  # noqa: BLE001 - no bnb, or no CPU backend: the native path cannot run
        return False
    if hasattr(ops, "_has_avx512"):
        return bool(ops._has_avx512)
    import torch

    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def repacks_4bit_on_cpu() -> bool:
    """Whether bnb 0.50's CPU backend repacks Linear4bit weights at the first inference forward
    (``has_avx512bf16()``); the two bugs it causes are held by strict xfails where it does."""
    try:
        from bitsandbytes.functional import has_avx512bf16

        return bool(has_avx512bf16())
    except Exception:  # noqa: BLE001 - no bnb native library: the repacking path cannot run either
        return False
