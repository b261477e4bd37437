"""The maintained GPTQ library, GPTQModel, as the suite drives it: quantize, save, reload, read back.

GPTQModel (ModelCloud; auto-gptq's successor) is what transformers' ``GPTQConfig`` reaches through
optimum for both halves of GPTQ: the per-linear algorithm (``gptqmodel.quantization.GPTQ``) and the
quantized linear kernels. The suite calls it directly (``GPTQModel.load(...).quantize(...)``)
because only its own config can leave decoder layers out, so that library and reference
(``scalellm.quant.gptq.quantize_model(layers=...)``) quantize the same linears on the same tokens:
``QuantizeConfig.dynamic`` patterns prefixed ``-:`` skip the modules they match
(``gptqmodel.quantization.config.dynamic_get`` returns False; ``looper.gptq_processor`` skips them),
whereas optimum's ``GPTQQuantizer.quantize_model`` walks every block and its
``modules_in_block_to_quantize`` picks modules by name suffix inside every block.

Settings that make the comparison with the reference like for like (each differs from a default):

* ``act_group_aware=False``: gptqmodel 7.x turns on its group-aware reordering ("GAR") for GPTQ by
  default (``GPTQConfig.__post_init__``); the paper and the reference have no such step.
* ``true_sequential=False``: every linear of a layer gets its Hessian from one pass of the
  unquantized layer, as ``quantize_model`` does (gptqmodel's default re-runs the layer after each
  group of linears; ``looper.module_looper``).
* ``fallback=None``: no silent round-to-nearest for a module that saw too few calibration tokens.

**Kernel:** ``BACKEND.TORCH`` selects ``TorchLinear`` (``nn_modules.qlinear.torch``): unpack,
dequantize and matmul in plain torch, so it runs on cpu and cuda without building an extension.
Its ``post_init`` wraps ``dequantize_weight`` in ``torch.compile`` (inductor: C++ through gcc on
cpu, triton on cuda, compiled at the first forward of each weight shape, tens of seconds on 2
cores); :func:`eager` restores the uncompiled method, the same arithmetic without a toolchain at
test time.

**dtype:** bfloat16. ``TorchLinear`` refuses float32 at load (``SUPPORTS_DTYPES``: fp16, bf16) and
GPTQModel's own choice for cpu and for float32 checkpoints is bf16 (``utils.model.auto_dtype``);
quantizing the model loaded in that dtype makes the model in memory and the reloaded one compute
alike. The Hessians are still accumulated in float32 (``HessianConfig.staging_dtype``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

#: GPTQModel sizes its CPU thread pool from this variable; its default, (cores + 1) // 2, gives 1 worker
#: on 2 cores and then fails ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only
#: has 1"; docs/evidence.md: gptqmodel on CPU). Set to 2 only when the user has not set it.
CPU_WORKERS_ENV, CPU_WORKERS = "GPTQMODEL_CPU_WORKERS", "2"
#: The kernel every quantized linear must use (gptqmodel.utils.backend.BACKEND.TORCH).
KERNEL = "TorchLinear"
DTYPE = "bfloat16"
#: Reference GPTQ's dampening (paper §4: 1 % of the mean diagonal); GPTQModel's default is 0.05.
DAMP = 0.01


def import_gptqmodel():
    """``gptqmodel``, imported with :data:`CPU_WORKERS_ENV` set if unset (it is read at import)."""
    os.environ.setdefault(CPU_WORKERS_ENV, CPU_WORKERS)
    import gptqmodel

    return gptqmodel


@dataclass(frozen=True)
class Settings:
    """One GPTQ quantization as GPTQModel is asked to do it."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True  # GPTQModel's and GPTQConfig's default
    desc_act: bool = False  # act-order off: GPTQConfig's default
    damp: float = DAMP
    layers: tuple[int, ...] | None = None  # decoder layers to quantize; None = all


def skip_layers(layers: tuple[int, ...] | None, num_layers: int) -> dict | None:
    """``dynamic`` entry skipping every decoder layer not in ``layers``: ``{"-:model\\.layers\\.(?:1|2)\\.": {}}``.

    GPTQModel matches a pattern from the start of the module's full name (pcre ``match``).
    """
    if layers is None:
        return None
    unknown = set(layers) - set(range(num_layers))
    if unknown:
        raise ValueError(f"layers {sorted(unknown)} outside the model's {num_layers} decoder layers")
    skipped = [str(i) for i in range(num_layers) if i not in layers]
    return {rf"-:model\.layers\.(?:{'|'.join(skipped)})\.": {}} if skipped else None


def quantize_config(settings: Settings, num_layers: int):
    """The ``gptqmodel.QuantizeConfig`` of ``settings`` (see the module docstring for each choice)."""
    gptqmodel = import_gptqmodel()
    return gptqmodel.QuantizeConfig(
        bits=settings.bits, group_size=settings.group_size, sym=settings.sym, desc_act=settings.desc_act,
        act_group_aware=False, damp_percent=settings.damp, true_sequential=False, fallback=None,
        dynamic=skip_layers(settings.layers, num_layers), offload_to_disk=False)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def eager(model):
    """Drop the ``torch.compile`` wrapper ``TorchLinear.post_init`` puts on each ``dequantize_weight``."""
    for module in quantized_linears(model).values():
        vars(module).pop("dequantize_weight", None)
    return model


@dataclass
class Quantized:
    qmodel: object  # gptqmodel's BaseQModel; .model is the transformers model
    seconds: float  # wall time of quantize() alone (calibration passes, GPTQ, packing)


def redirect_logs(directory: str | os.PathLike) -> Path:
    """Send GPTQModel's per-quantization log files to ``directory``.

    Each quantization writes ``<processor>_log_<random>_time_<date>.log`` under ``logs/`` relative to
    the *working directory* (``looper.loop_processor._PROJECT_LOG_DIR``), which would litter the
    checkout a suite runs in; the module global is read at every quantization, so setting it here
    moves them.
    """
    from gptqmodel.looper import loop_processor

    loop_processor._PROJECT_LOG_DIR = Path(directory)
    return loop_processor._PROJECT_LOG_DIR


def quantize(path: str | os.PathLike, calib_ids, settings: Settings, device: str, batch_size: int = 8,
             log_dir: str | os.PathLike | None = None) -> Quantized:
    """Load the dense checkpoint at ``path`` and quantize it with GPTQModel on ``calib_ids`` (sequences, length).

    GPTQModel's log files go to ``log_dir`` (default: ``gptqmodel-logs`` in the system's temp directory).
    """
    import tempfile

    import torch
    from transformers import AutoConfig

    gptqmodel = import_gptqmodel()
    redirect_logs(log_dir if log_dir is not None else Path(tempfile.gettempdir()) / "gptqmodel-logs")
    num_layers = AutoConfig.from_pretrained(path, local_files_only=True).num_hidden_layers
    qmodel = gptqmodel.GPTQModel.load(str(path), quantize_config(settings, num_layers), device=device,
                                      dtype=getattr(torch, DTYPE))
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib_ids]
    _sync(device)
    start = time.perf_counter()
    qmodel.quantize(calibration, batch_size=batch_size, backend=gptqmodel.BACKEND.TORCH)
    _sync(device)
    seconds = time.perf_counter() - start
    eager(qmodel.model)
    return Quantized(qmodel, seconds)


def save(qmodel, directory: str | os.PathLike) -> Path:
    """GPTQModel's own save (GPTQ v1 checkpoint format, safetensors, quantize_config.json)."""
    qmodel.save(str(directory))
    return Path(directory)


def load(directory: str | os.PathLike, device: str):
    """A saved GPTQ checkpoint reloaded by GPTQModel on the same kernel -> its wrapper (``.model``: transformers').

    The checkpoint stores scales in float16; loading in :data:`DTYPE` casts them to bfloat16.
    """
    import torch

    gptqmodel = import_gptqmodel()
    qmodel = gptqmodel.GPTQModel.load(str(directory), device=device, backend=gptqmodel.BACKEND.TORCH,
                                      dtype=getattr(torch, DTYPE))
    eager(qmodel.model).eval()
    return qmodel


def quantized_linears(model) -> dict:
    """Full name -> module of every GPTQ quantized linear in ``model`` (any kernel)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseQuantLinear)}


def packed_state(module) -> dict:
    """Copies of the buffers that hold a quantized linear's weights (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    return {name: getattr(module, name).detach().clone() for name in ("qweight", "qzeros", "scales", "g_idx")}


def dequantized_weight(module):
    """Ŵ (out, in) float32 of any linear-like module, read through its forward: ``module(I) - module(0) = IŴᵀ``.

    Kernel-agnostic (it needs no knowledge of the packing) and exact where the kernel's matmul is:
    each output is one weight times 1 plus zeros.
    """
    import torch

    sample = next(t for t in module.buffers() if t.is_floating_point())
    eye = torch.eye(module.in_features, dtype=sample.dtype, device=sample.device)
    with torch.no_grad():
        return (module(eye) - module(torch.zeros_like(eye[:1]))).T.float()


__all__ = ["CPU_WORKERS", "CPU_WORKERS_ENV", "DAMP", "DTYPE", "KERNEL", "Quantized", "Settings", "dequantized_weight",
           "eager", "import_gptqmodel", "load", "redirect_logs", "packed_state", "quantize", "quantize_config", "quantized_linears",
           "save", "skip_layers"]
