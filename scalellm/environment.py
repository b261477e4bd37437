"""The environment fingerprint stored with every baseline and printed by ``scalellm env``.

A figure without the versions it was measured with cannot explain a regression; the report puts
the differences between a baseline's fingerprint and the run's beside every failing metric.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

#: Packages whose versions move figures; each is recorded as its version or None when absent.
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "bitsandbytes",
    "gguf",
    "numpy",
    "safetensors",
    "llama_cpp_python",
    "gptqmodel",
    "optimum",
)

#: CPU flags that select code paths in bitsandbytes' and ggml's CPU kernels (devices.ISA_PATHS).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model_and_flags() -> tuple[str, list[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model or platform.machine(), [f for f in CPU_FLAGS if f in flags]


def cpu_model_id() -> str | None:
    """The processor's model numbers, which name its microarchitecture where the model name does not
    (a VM reports 'AMD EPYC' for several generations): x86 'family 25 model 1', Arm 'implementer 0x41
    part 0xd0c' (/proc/cpuinfo); None where there is no /proc/cpuinfo (macOS names its chip)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    for first, second in (("cpu family", "model"), ("CPU implementer", "CPU part")):
        if fields.get(first) and fields.get(second):
            return f"{first.split()[-1]} {fields[first]} {second.split()[-1]} {fields[second]}"
    return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask, not ``os.cpu_count()``, which counts the
    whole host's (a 16-core container on a large GPU server sees all of the server's cores)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def one_torch_thread():
    """torch's intra-op work on one CPU thread inside the block (the thread count restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def git_commit(repo: Path | None = None) -> str | None:
    """The checkout's commit (``-dirty`` when tracked files changed); SCALELLM_COMMIT names it where
    the tree travels without its .git (e.g. to a lent GPU machine)."""
    if os.environ.get("SCALELLM_COMMIT"):
        return os.environ["SCALELLM_COMMIT"]
    repo = repo or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if not commit:
        return None
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return commit + ("-dirty" if dirty else "")


def _cuda_facts() -> dict:
    try:
        import torch
    except ImportError:
        return {"cuda": None, "gpu": None, "driver": None}
    if not torch.cuda.is_available():
        return {"cuda": torch.version.cuda, "gpu": None, "driver": None}
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        driver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_GiB": round(props.total_memory / 2**30, 1),
        "driver": driver,
    }


@lru_cache(maxsize=1)
def fingerprint() -> dict:
    """Everything that may move a figure, as a flat, JSON-ready dict with sorted keys."""
    cpu, flags = cpu_model_and_flags()
    facts = {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "cpu": cpu,
        "cpu_flags": ",".join(flags),
        "cpu_model_id": cpu_model_id(),
        "cpu_cores": usable_cores(),
        "scalellm_commit": git_commit(),
        **{name: package_version(name) for name in TRACKED_PACKAGES},
        **_cuda_facts(),
    }
    return dict(sorted(facts.items()))


def fingerprint_id(facts: dict) -> str:
    """A short stable id of a fingerprint, used to share one copy among many metrics."""
    blob = json.dumps(facts, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


#: Keys that differ between any two runs without moving a figure; left out of difference reports.
VOLATILE_KEYS = ("scalellm_commit",)


def differences(baseline: dict, current: dict, *, include_volatile: bool = False) -> dict[str, tuple]:
    """{key: (baseline value, current value)} for every key whose value differs."""
    keys = sorted(set(baseline) | set(current))
    return {
        k: (baseline.get(k), current.get(k))
        for k in keys
        if baseline.get(k) != current.get(k) and (include_volatile or k not in VOLATILE_KEYS)
    }
