"""Which devices this machine has, and the *device class* a baseline is filed under.

A device class names the hardware a figure was measured on, so figures are only ever compared
with figures from the same kind of hardware: ``cpu-x86_64``, ``cuda-nvidia-h100-80gb-hbm3``,
``mps-apple-m2``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass

DEVICES = ("cpu", "cuda", "mps")

#: Restricts the devices that count as present (comma list), like bitsandbytes' BNB_TEST_DEVICE.
DEVICES_ENV = "SCALELLM_DEVICES"


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


def device_class(device: str, *, gpu_name: str | None = None, machine: str | None = None) -> str:
    """The baseline directory name for ``device`` on this machine.

    ``gpu_name`` and ``machine`` override what would be read from the hardware (for tests and
    for naming another machine's store).
    """
    if device == "cpu":
        return f"cpu-{slug(machine or platform.machine())}"
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
