"""LoRA arithmetic, independent of peft: which linears are targeted, how many parameters they add,
and the dequantized dense copy of a 4-bit base that adapters are merged into.

LoRA (Hu et al. 2021, arXiv:2106.09685, §4.1) adds to a frozen ``W`` of shape ``(out, in)`` the product
``(alpha / r) * B @ A`` with ``A: (r, in)`` and ``B: (out, r)``: ``r * (in + out)`` trainable
parameters per targeted linear.
"""

from __future__ import annotations

import math

#: Class names of the linear layers LoRA targets: torch's and bitsandbytes' quantized ones.
LINEAR_CLASSES = ("Linear", "Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def scaling(alpha: float, rank: int, rslora: bool = False, multiplier: float = 1.0) -> float:
    """The factor on ``B @ A``: ``alpha / r`` (LoRA §4.1), or ``alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023, arXiv:2312.03732, §3), times a user's multiplier (peft ``set_scale``)."""
    return multiplier * alpha / (math.sqrt(rank) if rslora else rank)


def targeted_linears(model) -> list[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every linear except the output layer.

    This is QLoRA's "all linear layers" (§4), the rule peft's ``target_modules="all-linear"`` states
    (every linear but the output embedding), written out here so the count is checked independently.
    """
    output = model.get_output_embeddings()
    out = []
    for name, module in model.named_modules():
        if module is output or type(module).__name__ not in LINEAR_CLASSES:
            continue
        out.append((name, int(module.in_features), int(module.out_features)))
    return out


def lora_parameter_count(linears, rank: int) -> int:
    """``sum(r * (in + out))`` over the targeted ``(name, in, out)`` linears."""
    return sum(rank * (fan_in + fan_out) for _, fan_in, fan_out in linears)


def dequantize_linear4bit(module, dtype=None):
    """The dense weight ``(out, in)`` of a bnb ``Linear4bit`` via ``bitsandbytes.functional.dequantize_4bit``.

    On AVX512-BF16 CPUs bnb repacks a 4-bit weight into a CPU-specific layout on its first inference
    forward (``Linear4bit.forward``, ``packing_format_for_cpu``); ``Linear4bit._save_to_state_dict``
    undoes that in place, so the weight is brought back to the canonical layout that way first.
    """
    import bitsandbytes.functional as F

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        module.state_dict()  # bnb: restores the canonical packed-uint8 layout in place
    dense = F.dequantize_4bit(weight.data, weight.quant_state)  # (out, in)
    return dense.to(dtype) if dtype is not None else dense


def dequantize_into(dense, quantized) -> int:
    """Overwrite the linears of ``dense`` (same architecture, e.g. the fp32 load of one checkpoint)
    with the dequantized weights of the bnb ``Linear4bit`` layers of ``quantized``; -> layers copied.

    The result is "the dequantized base": exactly the weights the 4-bit model multiplies with, held
    densely, which is what QLoRA adapters are merged into for export (QLoRA §3, Figure 1).
    """
    import torch

    dense_modules = dict(dense.named_modules())
    copied = 0
    for name, module in quantized.named_modules():
        if type(module).__name__ not in ("Linear4bit", "LinearNF4", "LinearFP4"):
            continue
        target = dense_modules[name]
        with torch.no_grad():
            target.weight.copy_(dequantize_linear4bit(module, target.weight.dtype).to(target.weight.device))
        copied += 1
    return copied


__all__ = ["LINEAR_CLASSES", "dequantize_linear4bit", "dequantize_into", "lora_parameter_count", "targeted_linears"]
