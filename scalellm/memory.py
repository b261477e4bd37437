"""Peak memory: measure it, reset it, and emulate a smaller GPU with a per-process cap.

CUDA: torch's caching allocator counts every byte it hands out; ``torch.cuda.reset_peak_memory_stats``
and ``torch.cuda.max_memory_allocated`` give the high-water mark of one phase. A smaller card is
emulated with ``torch.cuda.set_per_process_memory_fraction(cap / total)``: the allocator then
refuses (``torch.cuda.OutOfMemoryError``) any allocation that would bring its *reserved* memory
above the cap. What the allocator does not see — the CUDA context, about 0.3-0.6 GiB on recent
drivers — is outside both the cap and the peak, which is why :func:`card_cap_bytes` subtracts it.

CPU: the peak resident set size of the process (``VmHWM`` in ``/proc/self/status``, which Linux
resets when "5" is written to ``/proc/self/clear_refs``; elsewhere ``resource.getrusage``'s
``ru_maxrss``, which cannot be reset, so a phase's peak is then an upper bound).

:func:`measure` runs a function under an optional cap and turns an out-of-memory error into a
result that carries the peak measured until the failure, after freeing what the failed call held,
so the next measurement starts clean.
"""

from __future__ import annotations

import functools
import gc
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1 << 30
#: Memory of a consumer card that its CUDA context and driver take before the allocator sees any:
#: ~0.5 GiB (measured by torch users as ``nvidia-smi`` used minus ``torch.cuda.memory_reserved`` right
#: after ``torch.cuda.init()``; 0.3-0.6 GiB across drivers). An "8 GiB card" gives the allocator 7.5 GiB.
CONTEXT_RESERVE_BYTES = GIB // 2

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def card_cap_bytes(card_gib: float, context_reserve: int = CONTEXT_RESERVE_BYTES) -> int:
    """Bytes the allocator may use on a card of ``card_gib`` GiB: the card less its context."""
    return int(card_gib * GIB) - context_reserve


def synchronize(device: str) -> None:
    """Wait for queued kernels (so clocks and peaks see finished work); a no-op on CPU."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------- cpu


def _status_bytes(key: str) -> int | None:
    """The ``key`` line of ``/proc/self/status`` (Linux; kB there) in bytes, else None."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _vm_hwm() -> int | None:
    """Peak RSS in bytes from ``/proc/self/status`` (Linux), else None."""
    return _status_bytes("VmHWM")


def rss_peak_resettable() -> bool:
    """Whether this OS lets the process reset its peak RSS (Linux ``clear_refs``)."""
    return _CLEAR_REFS.exists() and _vm_hwm() is not None


def cpu_peak_bytes() -> int:
    """Peak resident set size of this process, in bytes."""
    hwm = _vm_hwm()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB on Linux


def reset_cpu_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux: write "5" to clear_refs); True if it was reset."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- any device


def reset_peak(device: str) -> None:
    """Start a new peak measurement on ``device``."""
    import torch

    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif device == "cpu":
        reset_cpu_peak()


def peak_bytes(device: str) -> int:
    """Peak memory since :func:`reset_peak`: allocator high-water on CUDA, current-allocated on MPS
    (MPS has no peak counter), peak RSS on CPU."""
    import torch

    synchronize(device)
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    return cpu_peak_bytes()


@functools.cache
def _libc():
    """The C library, if this platform's has ``malloc_trim`` (glibc), else None (looked up once:
    ``find_library`` may run ``ldconfig``)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing), so the
    resident set counts live memory rather than what the allocator keeps for reuse."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int | None:
    """This process's resident set size now (``VmRSS`` in ``/proc/self/status``, Linux), else None."""
    return _status_bytes("VmRSS")


def held_now(device: str) -> dict[str, int]:
    """What the process holds now, in bytes: ``{"resident": RSS}`` after collecting garbage and
    trimming the C heap (where the OS tells it) and, on a GPU, ``{"allocated": the allocator's live
    bytes}`` (CUDA ``memory_allocated``, MPS ``current_allocated_memory``)."""
    import torch

    synchronize(device)
    gc.collect()
    _release_free_heap()
    held = {}
    rss = resident_bytes()
    if rss is not None:
        held["resident"] = rss
    if device.startswith("cuda"):
        held["allocated"] = int(torch.cuda.memory_allocated())
    elif device == "mps":
        held["allocated"] = int(torch.mps.current_allocated_memory())
    return held


def growth_over_calls(fn, device: str, calls: int, warmup: int) -> dict[str, int]:
    """How much each :func:`held_now` figure grows over ``calls`` calls of ``fn()`` after ``warmup``
    calls (caches, lazily built kernels and pools settle in those), in bytes: the *median* growth of
    one call times ``calls``. A leak grows every call alike, so the median is the leak; the heap's
    own swings (tens of MB up one call, down the next, for int8's float16 temporaries) are not."""
    import statistics

    for _ in range(warmup):
        fn()
    readings = [held_now(device)]
    for _ in range(calls):
        fn()
        readings.append(held_now(device))
    return {name: int(statistics.median(b[name] - a[name] for a, b in zip(readings, readings[1:])) * calls)
            for name in readings[0]}


def free(device: str) -> None:
    """Collect garbage and give cached blocks back (CUDA/MPS), so a next phase starts clean."""
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


class cuda_cap:
    """Context manager: cap this process's CUDA allocator at ``cap_bytes`` (emulating a smaller card).

    ``set_per_process_memory_fraction(cap / total)`` on entry, fraction 1.0 on exit. The cap counts
    *reserved* memory, so cached free blocks count against it: call :func:`free` before entering.
    """

    def __init__(self, cap_bytes: int, device: str = "cuda"):
        self.cap_bytes = int(cap_bytes)
        self.device = device

    def _index(self) -> int:
        """The device index: set_per_process_memory_fraction refuses a bare "cuda"."""
        import torch

        index = torch.device(self.device).index
        return torch.cuda.current_device() if index is None else index

    def __enter__(self):
        import torch

        total = torch.cuda.get_device_properties(self._index()).total_memory
        if self.cap_bytes > total:
            raise ValueError(f"cap {self.cap_bytes} exceeds the device's {total} bytes")
        torch.cuda.set_per_process_memory_fraction(self.cap_bytes / total, self._index())
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.set_per_process_memory_fraction(1.0, self._index())
        return False


@dataclass
class Measured:
    """One capped (or uncapped) run: did it fit, and the peak it reached."""

    fit: bool
    peak_bytes: int  # peak since the reset, also when it ended in out-of-memory
    cap_bytes: int | None
    error: str = ""  # the first line of the out-of-memory message
    value: object = None  # what the function returned when it fit

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("value")
        return d


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def measure(fn, device: str, cap_bytes: int | None = None) -> Measured:
    """Run ``fn()`` with the peak reset first, under ``cap_bytes`` on CUDA when given.

    An out-of-memory error becomes ``Measured(fit=False, peak_bytes=...)``; the exception and its
    traceback (whose frames hold the failed step's tensors) are dropped and the cache is emptied
    before returning, and the peak counter is reset again, so the next case is unaffected.
    """
    if cap_bytes is not None and not device.startswith("cuda"):
        raise ValueError("a memory cap can only be emulated on CUDA")
    free(device)
    reset_peak(device)
    error = ""
    value = None
    try:
        if cap_bytes is None:
            value = fn()
        else:
            with cuda_cap(cap_bytes, device):
                value = fn()
    except (RuntimeError, MemoryError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not _is_oom(exc):
            raise
        error = str(exc).strip().splitlines()[0][:300]
    peak = peak_bytes(device)
    if error:
        free(device)
        reset_peak(device)
    return Measured(fit=not error, peak_bytes=peak, cap_bytes=cap_bytes, error=error, value=value)


__all__ = ["CONTEXT_RESERVE_BYTES", "GIB", "Measured", "card_cap_bytes", "cpu_peak_bytes", "cuda_cap", "free",
           "measure", "peak_bytes", "reset_cpu_peak", "reset_peak", "rss_peak_resettable", "synchronize"]
