"""Every loading method behind one call: ``load(checkpoint, method, device)`` -> (model, description).

A *method* is how the weights are held in memory:

========  ==============================================================  ===================
name      weights                                                         source
========  ==============================================================  ===================
fp32      dense float32                                                   transformers
bf16      dense bfloat16                                                  transformers
fp16      dense float16                                                   transformers
int8      LLM.int8 (vector-wise int8, outlier threshold 6.0)              bnb ``Linear8bitLt``
nf4       4-bit NormalFloat, block 64                                     bnb ``Linear4bit``
nf4-dq    NF4 with double quantization of the block constants            bnb ``Linear4bit``
fp4       bnb's 4-bit float, block 64                                     bnb ``Linear4bit``
fp4-dq    FP4 with double quantization                                    bnb ``Linear4bit``
========  ==============================================================  ===================

The quantized methods replace the ``nn.Linear`` layers of the decoder (attention and MLP); the
embeddings, norms and, as transformers leaves it, ``lm_head`` keep the compute dtype. The compute
dtype (``bfloat16`` as QLoRA uses it, or ``float32``) is what activations and dense layers use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: LLM.int8 outlier threshold (Dettmers et al. 2022, §3.3: "a threshold of 6.0 is sufficient").
INT8_THRESHOLD = 6.0
#: Block size of the 4-bit methods (QLoRA §3, bnb's default for quantize_4bit via transformers).
BLOCKSIZE_4BIT = 64


@dataclass(frozen=True)
class Method:
    name: str  # one of METHODS
    weights: str  # "float32" | "bfloat16" | "float16" | "int8" | "nf4" | "fp4"
    double_quant: bool = False  # 4-bit only: quantize the block constants again (QLoRA §3)

    @property
    def quantized(self) -> bool:
        return self.weights in ("int8", "nf4", "fp4")

    @property
    def marker(self) -> str:
        """The pytest method marker of its tests: the weight format when quantized (int8, nf4, fp4), else fp."""
        return self.weights if self.quantized else "fp"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fp32", "float32"),
    Method("bf16", "bfloat16"),
    Method("fp16", "float16"),
    Method("int8", "int8"),
    Method("nf4", "nf4"),
    Method("nf4-dq", "nf4", double_quant=True),
    Method("fp4", "fp4"),
    Method("fp4-dq", "fp4", double_quant=True),
)}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown loading method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


@dataclass(frozen=True)
class Loaded:
    """What a load produced, for reports and footprint checks."""

    method: str
    device: str
    compute_dtype: str
    checkpoint: str
    quantized_linears: int  # number of bnb Linear4bit / Linear8bitLt modules
    parameter_bytes: int  # bytes of all parameters (tied tensors once), as held on the device
    buffer_bytes: int  # bytes of all buffers (e.g. rotary tables)
    load_seconds: float
    #: :func:`held_bytes` right after the load, before any forward: bnb's CPU backend repacks 4-bit
    #: weights at the first forward on AVX512-BF16 machines (absmax to bfloat16, double quant undone).
    held: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(m: Method, compute_dtype: str):
    """The transformers ``BitsAndBytesConfig`` for a quantized method; None for dense ones."""
    if not m.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if m.weights == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=m.weights,
        bnb_4bit_use_double_quant=m.double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
    )


def tensor_bytes(model) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) as stored; a tied tensor counts once.

    bnb's ``Params4bit`` holds packed uint8 data (2 weights per byte); its quantization
    constants live in ``weight.quant_state`` and are counted by :func:`quant_state_bytes`.
    """
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def _storage_key(t) -> tuple:
    """Identity of the memory a tensor views: (device, storage address); views of one storage share it."""
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _quant_tensors(module):
    """(category, tensor) pairs of bnb's quantization state hanging off ``module.weight``.

    * ``Linear4bit``: ``weight.quant_state`` (bnb ``functional.QuantState``) holds ``absmax``
      (float32 per block of 64; uint8 codes under double quant), and under double quant ``offset``
      (float32 scalar, the mean subtracted before the second quantization) and ``state2.absmax``
      (float32 per block of 256 of the first absmax). ``code`` (16 float32, the NF4/FP4 table) and
      ``state2.code`` (256 float32, bnb's dynamic 8-bit map) are code tables: one tensor per layer,
      not shared between layers (measured: 210 distinct tables for 210 layers).
    * ``Linear8bitLt``: bnb 0.50 keeps the row scales on the parameter itself, ``weight.SCB``
      (float32, one per output row; ``Int8Params._quantize`` sets ``CB``, ``SCB`` =
      ``int8_vectorwise_quant(W.half())``); ``weight.CB`` is the same storage as ``weight.data``.
      ``module.state.SCB`` is None for an inference model (it is filled only during a forward with
      ``has_fp16_weights=True``).

    After the first forward on an AVX512-BF16 CPU, bnb repacks a ``Linear4bit``
    (``quant_state.packing_format_for_cpu``): ``absmax`` becomes bfloat16 of shape
    (in/blocksize, out), double quant is undone (``state2`` dropped, ``offset`` kept), and the
    packed weight is reshaped to (out, in/2) with the same bytes.
    """
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None:
        yield "quant_constants", state.absmax
        yield "code_tables", state.code
        if state.offset is not None:  # double quant; bnb's CPU repack keeps it after undoing DQ
            yield "quant_constants", state.offset
        state2 = getattr(state, "state2", None)
        if state2 is not None:
            yield "quant_constants", state2.absmax
            yield "code_tables", state2.code
    for name in ("CB", "SCB"):
        t = getattr(weight, name, None)
        if t is not None:
            yield "quant_constants", t
    mstate = getattr(module, "state", None)
    if mstate is not None and getattr(mstate, "SCB", None) is not None:
        yield "quant_constants", mstate.SCB


#: The categories of :func:`held_bytes`, in report order.
CATEGORIES = ("parameters", "buffers", "quant_constants", "code_tables")


def held_bytes(model) -> dict[str, int]:
    """Bytes the loaded model holds, per category of :data:`CATEGORIES`, each storage counted once.

    Walks parameters, buffers and bnb's quantization state (see :func:`_quant_tensors`) and counts
    each distinct storage (device, address) once, at its full ``nbytes``: tied embeddings, int8's
    ``CB`` (the same storage as the weight) and anything shared count once, in the first category
    that meets them.
    """
    seen: set[tuple] = set()
    out = dict.fromkeys(CATEGORIES, 0)

    def add(category: str, t) -> None:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            out[category] += t.untyped_storage().nbytes()

    for p in model.parameters():
        add("parameters", p)
    for b in model.buffers():
        add("buffers", b)
    for module in model.modules():
        for category, t in _quant_tensors(module):
            add(category, t)
    return out


def quant_state_bytes(model) -> int:
    """Bytes of bnb's quantization constants and code tables (absmax, DQ state, int8 row scales)."""
    held = held_bytes(model)
    return held["quant_constants"] + held["code_tables"]


def count_quantized_linears(model) -> int:
    names = {"Linear4bit", "Linear8bitLt"}
    return sum(type(m).__name__ in names for m in model.modules())


def saved_quantization(checkpoint: str | os.PathLike) -> dict | None:
    """The ``quantization_config`` a saved (pre-quantized) checkpoint declares, or None."""
    config = Path(checkpoint) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("quantization_config")


def _check_saved(m: Method, saved: dict) -> None:
    """Refuse to load a pre-quantized checkpoint under another method's name."""
    if m.weights == "int8":
        ok = bool(saved.get("load_in_8bit"))
    else:
        ok = (bool(saved.get("load_in_4bit")) and saved.get("bnb_4bit_quant_type") == m.weights
              and bool(saved.get("bnb_4bit_use_double_quant")) == m.double_quant)
    if not ok:
        raise ValueError(f"checkpoint is saved quantized as {saved!r}, which is not method {m.name!r}")


def load(checkpoint: str | os.PathLike, method_name: str = "fp32", device: str = "cpu",
         compute_dtype: str = "float32", *, attn_implementation: str | None = None):
    """Load a causal LM from a local HF directory -> (model in eval mode, :class:`Loaded`).

    ``compute_dtype`` is the dtype of the non-quantized parts and of 4-bit matmuls; for the dense
    methods the method's own dtype wins. Nothing is fetched from a hub (local files only).
    A checkpoint saved already quantized (``save_pretrained`` of a bnb model) is loaded as saved:
    its ``quantization_config`` must describe ``method_name``.
    """
    from transformers import AutoModelForCausalLM

    m = method(method_name)
    if not m.quantized:
        compute_dtype = m.weights
    kwargs = dict(dtype=_torch_dtype(compute_dtype), device_map={"": device}, local_files_only=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    saved = saved_quantization(checkpoint)
    if saved is not None:
        if not m.quantized:
            raise ValueError(f"checkpoint is saved quantized ({saved!r}); cannot load it as {m.name!r}")
        _check_saved(m, saved)
    else:
        config = quantization_config(m, compute_dtype)
        if config is not None:
            kwargs["quantization_config"] = config
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(Path(checkpoint), **kwargs)
    seconds = time.perf_counter() - start
    model.eval()
    params, buffers = tensor_bytes(model)
    info = Loaded(method=m.name, device=device, compute_dtype=compute_dtype, checkpoint=str(checkpoint),
                  quantized_linears=count_quantized_linears(model), parameter_bytes=params,
                  buffer_bytes=buffers, load_seconds=seconds, held=held_bytes(model))
    return model, info


# ---------------------------------------------------------------- peak memory of a load

#: Linux ``/proc/<pid>/clear_refs``: writing "5" resets the peak RSS (VmHWM) to the current RSS
#: (proc(5), "since Linux 4.0"), so the peak of one step can be read in a process that has
#: already imported torch.
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (VmRSS, VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


#: Packages transformers imports lazily inside ``from_pretrained`` when they are installed. They are
#: imported before the baseline RSS is read, so that the load peak counts weights, not module code:
#: with torchao installed (a GPTQModel dependency) the fp32 load peak read 438 MB instead of 128 MB
#: (cpu, 2026-11-26).
LAZY_IMPORTS = ("torchao",)


def _measure_load(checkpoint: str, method_name: str, device: str, compute_dtype: str) -> dict:
    """In this (fresh) process: import, reset the peak, load, return RSS and CUDA figures in bytes."""
    import importlib
    import importlib.util

    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS is read)

    for name in LAZY_IMPORTS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if device == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    if method(method_name).quantized:
        import bitsandbytes  # noqa: F401
    rss_before = _status_kib("VmRSS") * 1024
    Path(_CLEAR_REFS).write_text("5")
    model, info = load(checkpoint, method_name, device, compute_dtype)
    out = {
        "rss_before": rss_before,
        "rss_after": _status_kib("VmRSS") * 1024,
        "rss_peak": _status_kib("VmHWM") * 1024,
        "held": held_bytes(model),
        "load_seconds": info.load_seconds,
    }
    if device == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["cuda_allocated"] = torch.cuda.memory_allocated()
    return out


def peak_load_memory(checkpoint: str | os.PathLike, method_name: str, device: str = "cpu",
                     compute_dtype: str = "float32", *, timeout: float = 600) -> dict:
    """Peak memory of one load, measured in a fresh Python process (bytes).

    Keys: ``rss_before`` (after importing torch/transformers/bnb), ``rss_peak`` (VmHWM after the
    load, the peak having been reset just before it), ``rss_after``, ``held`` (:func:`held_bytes`),
    and on cuda ``cuda_peak_allocated`` / ``cuda_allocated`` (``torch.cuda.max_memory_allocated``).
    A fresh process is the only honest place: RSS high-water marks and freed-but-kept heap of
    earlier work in the calling process would leak into the figure.
    """
    code = ("import json, sys; from scalellm.load import _measure_load; "
            "print('SCALELLM-RESULT ' + json.dumps(_measure_load(*sys.argv[1:5])))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoint), method_name, device, compute_dtype],
                          capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("SCALELLM-RESULT "):
            return json.loads(line[len("SCALELLM-RESULT "):])
    raise RuntimeError(f"load of {method_name!r} on {device} in a child process failed "
                       f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
