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


def dequantize_4bit_takes_native_kernel(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether bnb 0.50's CPU ``dequantize_4bit`` runs its native kernel for this shape, by its own
    rule: an even last dimension, unless the AVX512 path meets a block size of 2048 or more (then,
    like an odd last dimension, it falls back to the pure-torch decode). The native kernel is where
    a 1-D input comes back as a (1, n) row."""
    return len(shape) > 0 and shape[-1] % 2 == 0 and not (dequantize_4bit_takes_avx512() and blocksize >= 2048)


def rows_straddle_blocks(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether bnb's native CPU decode (even last dimension) sees rows that do not start on block
    boundaries, where bnb 0.50.2's AVX512 path misplaces absmax (``test_blockwise_4bit``'s strict
    xfail). Cases outside this rule were all measured right (5 row counts x 9 widths x 6 block sizes,
    cpu, 2026-11)."""
    return len(shape) > 1 and shape[-1] % 2 == 0 and shape[-1] % blocksize != 0
