"""Which devices this machine has, and the *device class* that names its hardware.

A device class is the hardware that sets a figure's speed, so a ``class``-scoped baseline is only
compared on the same class (``scalellm.baselines``: levels):

- cpu: vendor and model, the ISA path the kernels take, and the cores this process may use:
  ``cpu-intel-xeon-amx-2c``, ``cpu-amd-epyc-avx2-2c``. bitsandbytes and ggml pick their CPU kernels
  from the processor's flags (AVX2, AVX512, AVX512-BF16, AMX), and a 2-core and a 16-core box differ
  in every throughput figure;
- cuda: the GPU model, ``cuda-nvidia-h100-80gb-hbm3``;
- mps: the Apple chip, ``mps-apple-m2-pro``.

``SCALELLM_DEVICE_CLASS`` overrides the class of a run (comma list, one class per device, each
starting with its device: ``cpu-elsewhere,cuda-my-card``), e.g. to show what a machine without class
baselines gets.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass

from scalellm import environment

DEVICES = ("cpu", "cuda", "mps")

#: Restricts the devices that count as present (comma list), like bitsandbytes' BNB_TEST_DEVICE.
DEVICES_ENV = "SCALELLM_DEVICES"
#: Overrides the device class of a run: a comma list of classes, each starting with its device.
DEVICE_CLASS_ENV = "SCALELLM_DEVICE_CLASS"

#: The ISA path of x86 CPU kernels, fastest first: (name, the /proc/cpuinfo flag that enables it).
#: bitsandbytes' CPU backend and ggml dispatch on these flags (AMX tiles, AVX512-BF16, AVX512F, AVX2).
ISA_PATHS = (("amx", "amx_bf16"), ("avx512bf16", "avx512_bf16"), ("avx512", "avx512f"), ("avx2", "avx2"))
#: Words of a CPU's marketing name that say nothing about its speed.
_CPU_NAME_NOISE = re.compile(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith\b.*$", re.IGNORECASE)


@dataclass(frozen=True)
class Availability:
    device: str
    available: bool
    reason: str  # why not, when not available; empty otherwise


def _torch():
    import torch

    return torch


def availability(device: str) -> Availability:
    """Whether ``device`` can run here, with a one-line reason when it cannot."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")
    allowed = os.environ.get(DEVICES_ENV)
    if allowed and device not in {d.strip() for d in allowed.split(",")}:
        return Availability(device, False, f"{device}: not in {DEVICES_ENV}={allowed}")
    if device == "cpu":
        return Availability(device, True, "")
    torch = _torch()
    if device == "cuda":
        if torch.cuda.is_available():
            return Availability(device, True, "")
        return Availability(device, False, "cuda: torch.cuda.is_available() is False")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Availability(device, True, "")
    return Availability(device, False, "mps: torch.backends.mps.is_available() is False")


def gpu_count() -> int:
    torch = _torch()
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def multigpu_availability() -> Availability:
    n = gpu_count()
    if n >= 2:
        return Availability("multigpu", True, "")
    return Availability("multigpu", False, f"multigpu: torch.cuda.device_count() is {n}, need 2 or more")


def slug(text: str) -> str:
    """Lower-case, dash-separated: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; keeps '_' (x86_64)."""
    return re.sub(r"[^a-z0-9_]+", "-", text.lower()).strip("-")


def _mac_chip() -> str:
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "apple"
    except (OSError, subprocess.SubprocessError):
        return "apple"


def isa_path(flags, machine: str | None = None) -> str:
    """The fastest ISA path of ``flags`` (``ISA_PATHS``); non-x86 machines name their architecture."""
    flags = set(flags)
    for name, flag in ISA_PATHS:
        if flag in flags:
            return name
    return slug(machine or platform.machine())


def cpu_class(model: str, flags, cores: int, machine: str | None = None) -> str:
    """``cpu-<vendor-model>-<isa path>-<cores>c``, e.g. 'Intel(R) Xeon(R) Processor' with AMX on 2 cores
    -> ``cpu-intel-xeon-amx-2c``."""
    name = slug(_CPU_NAME_NOISE.sub(" ", model)) or slug(machine or platform.machine())
    return f"cpu-{name}-{isa_path(flags, machine)}-{cores}c"


def class_override(device: str) -> str | None:
    """The class ``SCALELLM_DEVICE_CLASS`` names for ``device``, or None; a malformed value raises."""
    value = os.environ.get(DEVICE_CLASS_ENV, "").strip()
    if not value:
        return None
    chosen = None
    for item in (v.strip() for v in value.split(",")):
        kind = item.split("-", 1)[0]
        if kind not in DEVICES or item == kind or slug(item) != item:
            raise ValueError(f"{DEVICE_CLASS_ENV}={value!r}: {item!r} is not a device class "
                             f"(lower-case, dash-separated, starting with one of {', '.join(DEVICES)}, "
                             "e.g. cpu-elsewhere)")
        if kind == device:
            chosen = item
    return chosen


def device_class(device: str, *, gpu_name: str | None = None, machine: str | None = None) -> str:
    """The device class of ``device`` on this machine (``SCALELLM_DEVICE_CLASS`` overrides it).

    ``gpu_name`` and ``machine`` override what would be read from the hardware (for tests and
    for naming another machine's store).
    """
    override = class_override(device) if device in DEVICES else None
    if override:
        return override
    if device == "cpu":
        model, flags = environment.cpu_model_and_flags()
        return cpu_class(model, flags, environment.usable_cores(), machine)
    if device == "cuda":
        name = gpu_name or _torch().cuda.get_device_name(0)
        return f"cuda-{slug(name)}"
    if device == "mps":
        return f"mps-{slug(gpu_name or _mac_chip())}"
    raise ValueError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)}")


def default_device() -> str:
    """The best device present: cuda, then mps, then cpu."""
    for device in ("cuda", "mps"):
        if availability(device).available:
            return device
    return "cpu"
