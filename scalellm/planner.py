"""Memory planner: will this model, with this method and task, fit my card?

``plan(model, Setting(...))`` predicts the peak GPU memory of one of four tasks — ``inference``
(a prefill of the whole context, the worst moment of ``generate``), ``lora`` / ``qlora`` (frozen
base, adapters on every attention and MLP linear) and ``full`` fine-tuning — as a sum of parts:

==========================  ==================================================================
weights                     parameters x bytes of the method (quantized linears at their bits)
quantization constants      bnb block absmax (QLoRA §3), LLM.int8 row scales, GPTQ group scales
LoRA parameters             r x (in + out) per adapted linear, float32 (peft's default adapter dtype)
gradients                   one per trainable parameter, in its dtype
optimizer states            AdamW: 2 per trainable parameter; bnb paged 8-bit: 2 bytes + block absmax
activations                 saved-for-backward tensors (training) or prefill transients (inference)
KV cache                    2 x layers x kv_heads x head_dim x context x batch x bytes
CUDA context + allocator    context outside torch's allocator; cuBLAS workspace; allocator slack
==========================  ==================================================================

Parameter counts come from the config itself: the model is built on the meta device (no memory),
so every count is exact. The activation terms follow the per-layer accounting of Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1: ``sbh(34 + 5as/h)``
bytes per layer in fp16 without recomputation; with full recomputation only each layer's input,
``2sbh``, is kept) — but our target is the *measured* peak (``torch.cuda.max_memory_allocated``) of
transformers + peft + bitsandbytes, which differs from Megatron's: SDPA attention keeps no ``s²``
scores, SwiGLU MLPs keep four ``sbi`` tensors, HF's RMSNorm upcasts to float32, peft casts each
adapted linear's input to the adapters' float32, and the loss upcasts the logits to float32. The
coefficients below are therefore written per tensor kind (``sbh``, ``sbi``, ``sbV``) and calibrated
against those libraries; each constant says what it counts and how it was fixed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

GIB = 1 << 30
GB = 10**9

METHODS = ("fp32", "bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4", "fp4-dq", "gptq4")  # + "gguf:TYPE"
TASKS = ("inference", "lora", "qlora", "full")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
#: Consumer cards the verdict is given for (GiB of device memory).
CARDS_GIB = (8, 12, 16, 24)

#: Bytes per element of the dense dtypes.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Dtype of everything a quantized method does not quantize (embeddings, norms, lm_head) and of the
#: activations: bfloat16, the QLoRA compute dtype (QLoRA §3 "BFloat16 computation data type").
QUANT_COMPUTE = "bf16"
#: bnb 4-bit block size (bnb ``quantize_4bit`` default, as transformers' BitsAndBytesConfig uses it).
BLOCKSIZE_4BIT = 64
#: GPTQ group size (the GPTQ paper's 128-column groups, the default of optimum / gptqmodel).
GPTQ_GROUP = 128
#: peft creates LoRA A/B in float32 (``autocast_adapter_dtype=True``, peft >= 0.12).
LORA_BYTES = 4
#: bnb 8-bit optimizers: states of tensors under ``min_8bit_size`` = 4096 elements stay float32;
#: 8-bit states carry one float32 absmax per 256-element block (bnb ``Optimizer8bit``).
BNB_MIN_8BIT_SIZE, BNB_OPT_BLOCK = 4096, 256

# ---- calibrated coefficients (bytes per element of the tensor kind named) ----------------------
# Fitted by least squares to torch.cuda.max_memory_allocated on an H100 (torch 2.11, transformers
# 5.17, peft, bitsandbytes 0.50.2; 11 QLoRA steps over smollm2-135m, tinyllama-1.1b, llama-2-7b,
# seq 256-2048, batch 1-4, with and without checkpointing; residuals under 0.07 GiB), with the MLP
# coefficient fixed by counting tensors because h and i move together in those models.
#
# LoRA / QLoRA, frozen base, bf16 compute, SDPA attention (no s^2 scores), no recomputation.
# Per s*b*h per layer: RMSNorm upcasts to fp32 and keeps fp32 copies (2 norms), peft casts each
# adapted linear's input to fp32 (q, k, v, o, gate, up), q/k/v/attention output in bf16: fitted 32.
# A LayerNorm model (GPT-2, Pythia: fused layer_norm keeps its bf16 input) saves 16 of those.
LORA_ACT_H = {"rms": 32.0, "layer": 16.0}
# Per s*b*i per layer: gated MLP (SwiGLU) keeps gate, up, act(gate), product in bf16 (4 x 2) and
# peft's fp32 copy of down's input (4): 12. A plain MLP keeps fc1's output and act's output (2 x 2)
# and the fp32 copy (4): 8. Checked on pythia-410m (LayerNorm, GELU): within 2% of the measured peak.
LORA_ACT_I = {True: 12.0, False: 8.0}
# Full fine-tuning (every weight trainable): no peft fp32 copies (-16 per sbh for q/k/v/o, -8 for
# gate/up, -4 per sbi for down) but base linears keep their bf16 inputs for the weight gradients
# (+6 per sbh, +2 per sbi). Derived from the LoRA fit, not yet measured on CUDA.
FULL_ACT_DELTA_H = -18.0
FULL_ACT_DELTA_I = -2.0
# Gradient checkpointing (transformers, non-reentrant): each layer keeps its bf16 input (2 per sbh);
# in backward the loss's tensors are freed before a layer is recomputed, so the peak is the kept
# inputs plus the larger of the loss's tensors and one layer's activations (fits the 5 CUDA cases).
CKPT_ACT_H = 2.0
# Loss over the vocabulary, bytes per s*b*V: bf16 logits (2), the fp32 upcast in ``ForCausalLMLoss``
# (4), log_softmax's kept output (4), part of its gradient: fitted 12 (theory 10-14).
LOGITS_TRAIN = 12.0
# Inference prefill, one layer's transients per s*b*h and s*b*i (residual, q/k/v, attention output;
# gate/up/act at once), logits for the last position only (``logits_to_keep=1``, fp32). Matched 7
# dense and 4-bit CUDA cases within 0.02 GiB of the dynamic part.
INFER_ACT_H = 8.0
INFER_ACT_I = 6.0
# GPT-2's ``gelu_new`` is written in Python ops: three more s*b*i temporaries (measured gpt2 fp32).
EXTRA_ACT_I = {"gelu_new": 6.0}
#: cuBLAS workspace, allocated through torch's caching allocator (32 MiB on Hopper, one per stream
#: and handle; training's backward runs on autograd's thread with its own handle): measured +32 MiB
#: held in inference, +64 MiB in training.
CUBLAS_WORKSPACE_BYTES = 32 << 20
#: CUDA context and kernels outside torch's allocator: ~0.5 GiB on recent drivers (nvidia-smi used
#: minus ``torch.cuda.memory_reserved`` right after init; 0.3-0.6 GiB across drivers).
CUDA_CONTEXT_BYTES = GIB // 2
#: Caching-allocator slack, reserved over allocated at the peak: measured 1.04-1.25 (median 1.08)
#: over the 23 CUDA cases; 12% covers all but the smallest int8 model.
ALLOCATOR_SLACK = 0.12


class PlanError(ValueError):
    """Bad input to the planner; ``str(error)`` is the one-line message the CLI prints."""


# ---------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    name: str
    model_type: str
    parameters: int  # distinct parameters (tied embeddings once), exact from the meta model
    base_tensor_elements: int  # base model (no LM head) parameters + buffers: accelerate's count
    linear_parameters: int  # weights of the linears quantization replaces (all but lm_head)
    linear_bias: int  # their biases (kept in the compute dtype)
    linear_shapes: tuple[tuple[int, int], ...]  # (in, out) of each such linear, the LoRA targets
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    rms_norm: bool  # RMSNorm (Llama family) or LayerNorm (GPT-2, Pythia)
    gated_mlp: bool  # SwiGLU-style gate/up/down, or fc1/act/fc2
    hidden_act: str

    @property
    def other_parameters(self) -> int:
        """Parameters outside the quantized linears: embeddings, norms, lm_head, biases."""
        return self.parameters - self.linear_parameters


#: Attributes the planner needs; a config.json may give each under its canonical name or the name
#: its config class maps it to (``attribute_map``, e.g. GPT-2's ``n_embd`` for ``hidden_size``).
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _config_dict(model: str) -> tuple[str, dict]:
    """(display name, config dict) for a shape fixture name, a config.json, or a checkpoint dir."""
    from scalellm import shapes

    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{model}: a directory without config.json")
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PlanError(f"{model}: no such file")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path}: not a readable JSON config ({exc.__class__.__name__})") from exc
        if not isinstance(data, dict):
            raise PlanError(f"{path}: not a JSON object")
        return str(model), {k: v for k, v in data.items() if k != shapes.META_KEY}
    if model in shapes.list_shapes():
        return model, shapes.shape_dict(model)
    raise PlanError(f"unknown model {model!r}: not a shape fixture ({', '.join(shapes.list_shapes())}), "
                    "a config.json or a checkpoint directory")


def _check_fields(name: str, data: dict):
    """The transformers config class for ``data``; PlanError naming any field that is missing."""
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if not model_type:
        raise PlanError(f"{name}: config lacks model_type")
    if model_type not in CONFIG_MAPPING:
        raise PlanError(f"{name}: model_type {model_type!r} is unknown to transformers")
    cls = CONFIG_MAPPING[model_type]
    aliases = getattr(cls, "attribute_map", {}) or {}
    missing = []
    for field_name in REQUIRED_FIELDS:
        keys = [field_name] + ([aliases[field_name]] if field_name in aliases else [])  # gpt2: n_embd
        if not any(k in data for k in keys):
            missing.append(" or ".join(keys))
    if missing:
        raise PlanError(f"{name}: config lacks {', '.join(missing)}")
    return cls


@lru_cache(maxsize=32)
def _shape_from_json(name: str, blob: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(blob)
    model_type = data.pop("model_type")
    data.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parameters = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    base = model.base_model
    base_elements = sum(p.numel() for p in base.parameters()) + sum(b.numel() for b in base.buffers())
    output = model.get_output_embeddings()
    shapes_, weights, biases = [], 0, 0
    for module in base.modules():
        # nn.Linear (weight out x in) and transformers' Conv1D (weight in x out, GPT-2)
        kind = type(module).__name__
        if module is output or kind not in ("Linear", "Conv1D"):
            continue
        w = module.weight
        fan_in, fan_out = (w.shape[1], w.shape[0]) if kind == "Linear" else (w.shape[0], w.shape[1])
        shapes_.append((int(fan_in), int(fan_out)))
        weights += w.numel()
        biases += module.bias.numel() if getattr(module, "bias", None) is not None else 0
    hidden = int(config.hidden_size)
    heads, kv_heads, head_dim = attention_dims(config)
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    rms = any("RMSNorm" in type(m).__name__ for m in base.modules())
    per_layer = len(shapes_) // int(config.num_hidden_layers)
    gated = per_layer >= 7 or sum(1 for i_, o in shapes_ if o == intermediate) > int(config.num_hidden_layers)
    act = str(getattr(config, "hidden_act", None) or getattr(config, "activation_function", "") or "")
    return ModelShape(name=name, model_type=model_type, parameters=int(parameters),
                      base_tensor_elements=int(base_elements), linear_parameters=int(weights),
                      linear_bias=int(biases), linear_shapes=tuple(shapes_), hidden=hidden,
                      intermediate=int(intermediate), layers=int(config.num_hidden_layers), heads=heads,
                      kv_heads=kv_heads, head_dim=head_dim, vocab=int(config.vocab_size), tied=bool(tied),
                      rms_norm=rms, gated_mlp=bool(gated), hidden_act=act)


def attention_dims(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a transformers config; grouped-query attention
    (Mistral, TinyLlama) has fewer key/value heads than query heads."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    return heads, kv_heads, head_dim


def kv_cache_bytes_per_token(config, element_bytes: int) -> int:
    """K and V of every layer for one token of one sequence: 2 x layers x kv heads x head dim x bytes."""
    _, kv_heads, head_dim = attention_dims(config)
    return 2 * int(config.num_hidden_layers) * kv_heads * head_dim * element_bytes


def model_shape(model: str) -> ModelShape:
    """The shape of ``model`` (fixture name, config.json, or checkpoint dir), built on meta."""
    name, data = _config_dict(model)
    _check_fields(name, data)
    try:
        return _shape_from_json(name, json.dumps(data, sort_keys=True))
    except (TypeError, ValueError, AttributeError) as exc:
        raise PlanError(f"{name}: transformers cannot build this config ({exc})".splitlines()[0]) from exc


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    method: str = "bf16"  # one of METHODS or "gguf:TYPE"
    task: str = "inference"  # one of TASKS
    seq: int = 512  # training sequence length, or the whole context for inference
    batch: int = 1
    rank: int = 16  # LoRA r
    grad_checkpointing: bool = False
    optimizer: str = "adamw"


def _method_bits(method: str) -> tuple[str, float]:
    """(family, bits per quantized weight): ('dense', 16), ('bnb4', 4), ('gguf', 4.5), ..."""
    if method in DTYPE_BYTES:
        return "dense", 8.0 * DTYPE_BYTES[method]
    if method == "int8":
        return "int8", 8.0
    if method in ("nf4", "nf4-dq", "fp4", "fp4-dq"):
        return "bnb4", 4.0
    if method == "gptq4":
        return "gptq", 4.0
    if method.startswith("gguf:"):
        kind = method.split(":", 1)[1].upper()
        if kind in ("F32", "F16", "BF16"):
            return "gguf", 32.0 if kind == "F32" else 16.0
        from scalellm.quant import gguf

        try:
            return "gguf", float(gguf.bits_per_weight(kind))
        except ValueError as exc:
            raise PlanError(f"method {method!r}: {exc}") from exc
    raise PlanError(f"unknown method {method!r}; known: {', '.join(METHODS)}, gguf:TYPE")


def check_setting(s: Setting) -> None:
    family, _ = _method_bits(s.method)
    if s.task not in TASKS:
        raise PlanError(f"unknown task {s.task!r}; known: {', '.join(TASKS)}")
    if s.optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {s.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    for label, value in (("seq", s.seq), ("batch", s.batch), ("rank", s.rank)):
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"--{label} must be a positive integer, got {value!r}")
    if family == "gguf" and s.task != "inference":
        raise PlanError(f"{s.method}: GGUF models are for inference (llama.cpp); training needs a HF checkpoint")
    if s.task == "full" and family != "dense":
        raise PlanError(f"full fine-tuning needs dense weights (fp32/bf16/fp16), not {s.method}; "
                        "use --task qlora for a quantized base")
    if s.task == "qlora" and family not in ("bnb4", "int8", "gptq"):
        raise PlanError(f"qlora trains adapters on a quantized base: use --method nf4/fp4/int8/gptq4, "
                        f"or --task lora for {s.method}")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_budget(text: str) -> int:
    """'8GiB', '7.5 GB', '12' (GiB) -> bytes; PlanError for anything else (negative, unknown unit)."""
    match = _SIZE.match(str(text))
    if not match:
        raise PlanError(f"budget {text!r} is not a size like 8GiB, 7.5GB or 12 (GiB)")
    value = float(match.group(1)) * _UNITS[match.group(2) or "GiB"]
    if value <= 0:
        raise PlanError(f"budget {text!r} must be larger than zero")
    return int(value)


# ---------------------------------------------------------------- the parts


@dataclass
class Plan:
    model: str
    setting: dict
    parameters: int
    trainable: int
    parts: dict[str, int]  # bytes per component, in display order
    torch_allocated: int  # what torch.cuda.max_memory_allocated should read at the peak
    peak: int  # what the card must hold: allocated + allocator slack + CUDA context
    accelerate_estimate: int | None  # `accelerate estimate-memory` "Total Size" for this dtype
    accelerate_dtype: str | None
    rule_of_thumb: float  # seed's rule: bytes/param x (params in billions), in GB
    fits: dict[str, bool] = field(default_factory=dict)  # "8 GiB" -> fits
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    def to_json(self) -> dict:
        data = asdict(self)
        data["peak_GiB"] = round(self.peak / GIB, 3)
        data["torch_allocated_GiB"] = round(self.torch_allocated / GIB, 3)
        data["parts_GiB"] = {k: round(v / GIB, 4) for k, v in self.parts.items()}
        return data


PART_NAMES = ("weights", "quantization constants", "LoRA parameters", "gradients", "optimizer states",
              "activations", "KV cache", "CUDA context", "allocator overhead")


def _weights(shape: ModelShape, family: str, bits: float, method: str) -> tuple[int, int]:
    """(weight bytes, quantization-constant bytes)."""
    if family == "dense":
        return shape.parameters * DTYPE_BYTES[method], 0
    other = shape.other_parameters * DTYPE_BYTES[QUANT_COMPUTE]  # embeddings, norms, biases, lm_head
    if family == "int8":
        # Linear8bitLt: int8 weight + one float32 scale per output row (bnb ``SCB``)
        return other + shape.linear_parameters, sum(out * 4 for _, out in shape.linear_shapes)
    if family == "bnb4":
        from scalellm.quant.blockwise import constant_bits_per_parameter

        dq = method.endswith("-dq")
        consts = sum(constant_bits_per_parameter(BLOCKSIZE_4BIT, dq, i * o) * i * o for i, o in shape.linear_shapes)
        return other + shape.linear_parameters // 2, int(math.ceil(consts / 8))
    if family == "gptq":
        # per group of 128 input rows and output column: fp16 scale + packed 4-bit zero; int32 g_idx per input
        consts = sum(math.ceil(i / GPTQ_GROUP) * o * (2 + Fraction(1, 2)) + 4 * i for i, o in shape.linear_shapes)
        return other + shape.linear_parameters // 2, int(consts)
    # gguf: every matrix (embeddings and output included) at the type's bits; scales are inside them
    matrices = shape.linear_parameters + shape.vocab * shape.hidden * (1 if shape.tied else 2)
    vectors = shape.parameters - matrices
    return int(matrices * bits / 8) + vectors * 4, 0


def _lora_parameters(shape: ModelShape, rank: int) -> int:
    """r x (in + out) per adapted linear (LoRA §4.1: W + BA with A: r x in, B: out x r)."""
    return sum(rank * (i + o) for i, o in shape.linear_shapes)


def _optimizer_bytes(trainable_sizes: list[int], param_bytes: int, optimizer: str) -> int:
    if optimizer == "adamw":  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
        return sum(2 * n * param_bytes for n in trainable_sizes)
    total = 0  # bnb 8-bit: two uint8 states + float32 absmax per 256 block, small tensors stay fp32
    for n in trainable_sizes:
        total += 2 * 4 * n if n < BNB_MIN_8BIT_SIZE else 2 * (n + 4 * math.ceil(n / BNB_OPT_BLOCK))
    return total


def _activations(shape: ModelShape, s: Setting, act_bytes: int, family: str) -> int:
    """Bytes of activations at the peak (module docstring; coefficients above)."""
    sb = s.seq * s.batch
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    scale = act_bytes / 2  # coefficients are for bf16/fp16 activations; fp32 doubles them
    extra_i = EXTRA_ACT_I.get(shape.hidden_act, 0.0)
    if s.task == "inference":
        largest = max((fi * fo for fi, fo in shape.linear_shapes), default=0)
        widest = max((fo for _, fo in shape.linear_shapes), default=0)
        transient = {"bnb4": largest * 2,  # bnb dequantizes a whole weight to bf16 for a prefill matmul
                     "int8": sb * widest * 4 + sb * max(fi for fi, _ in shape.linear_shapes)}.get(family, 0)
        return int(sb * (INFER_ACT_H * h + (INFER_ACT_I + extra_i) * i) * scale + s.batch * shape.vocab * 4
                   + transient)
    per_h = LORA_ACT_H["rms" if shape.rms_norm else "layer"]
    per_i = LORA_ACT_I[shape.gated_mlp] + extra_i
    if s.task == "full":
        per_h, per_i = per_h + FULL_ACT_DELTA_H, per_i + FULL_ACT_DELTA_I
    one_layer = sb * (per_h * h + per_i * i) * scale
    logits = sb * shape.vocab * LOGITS_TRAIN * scale
    if s.grad_checkpointing:
        return int(layers * sb * CKPT_ACT_H * h * scale + max(one_layer, logits))
    return int(layers * one_layer + logits)


def _accelerate(shape: ModelShape, family: str, method: str) -> tuple[int | None, str | None]:
    """What ``accelerate estimate-memory`` prints as "Total Size": it builds ``AutoModel`` (no LM head)
    in float32 on meta, sums parameters + buffers in bytes (``calculate_maximum_sizes``), then divides
    by 2 for float16, 4 for int8, 8 for int4 (``gather_data``)."""
    dtype = {"fp32": "float32", "bf16": "float16", "fp16": "float16", "int8": "int8",
             "bnb4": "int4", "gptq": "int4"}.get(method if family == "dense" else family)
    if dtype is None:
        return None, None
    divisor = {"float32": 1, "float16": 2, "int8": 4, "int4": 8}[dtype]
    return shape.base_tensor_elements * 4 // divisor, dtype


def plan(model: str, setting: Setting, budget: int | None = None) -> Plan:
    """The predicted peak of ``setting`` for ``model``, broken down, with fit verdicts."""
    check_setting(setting)
    shape = model_shape(model)
    family, bits = _method_bits(setting.method)
    weights, consts = _weights(shape, family, bits, setting.method)
    act_bytes = DTYPE_BYTES.get(setting.method, DTYPE_BYTES[QUANT_COMPUTE])
    parts = dict.fromkeys(PART_NAMES, 0)
    parts["weights"], parts["quantization constants"] = weights, consts
    notes = []
    trainable = 0
    if setting.task == "inference":
        kv_bytes = 2 if family == "gguf" else act_bytes  # llama.cpp's default cache type is f16
        parts["KV cache"] = 2 * shape.layers * shape.kv_heads * shape.head_dim * setting.seq * setting.batch * kv_bytes
    else:
        if setting.task == "full":
            sizes = [shape.parameters]
            param_bytes = DTYPE_BYTES[setting.method]
        else:
            sizes = [setting.rank * n for io in shape.linear_shapes for n in io]  # A: r x in, B: out x r
            param_bytes = LORA_BYTES
            parts["LoRA parameters"] = _lora_parameters(shape, setting.rank) * LORA_BYTES
        trainable = sum(sizes)
        parts["gradients"] = trainable * param_bytes
        parts["optimizer states"] = _optimizer_bytes(sizes, param_bytes, setting.optimizer)
    parts["activations"] = _activations(shape, setting, act_bytes, family)
    paged = setting.optimizer == "paged_adamw_8bit" and setting.task != "inference"
    if paged:
        notes.append("paged 8-bit optimizer states live in CUDA unified memory: they occupy the card "
                     "when resident but are not counted by torch.cuda.max_memory_allocated")
    if setting.task == "full":
        notes.append("full fine-tuning: gradients, optimizer states and activations are summed, an "
                     "upper bound (early layers' gradients appear as activations are freed)")
    if family == "gguf":
        notes.append("gguf: llama.cpp, not torch; weights include the block scales, KV cache in f16")
    workspace = CUBLAS_WORKSPACE_BYTES * (1 if setting.task == "inference" else 2) if family != "gguf" else 0
    allocated = sum(parts.values()) + workspace - (parts["optimizer states"] if paged else 0)
    parts["allocator overhead"] = workspace + int(allocated * ALLOCATOR_SLACK)
    parts["CUDA context"] = CUDA_CONTEXT_BYTES
    peak = sum(parts.values())
    acc, acc_dtype = _accelerate(shape, family, setting.method)
    result = Plan(model=shape.name, setting=asdict(setting), parameters=shape.parameters, trainable=trainable,
                  parts=parts, torch_allocated=allocated, peak=peak, accelerate_estimate=acc,
                  accelerate_dtype=acc_dtype, rule_of_thumb=shape.parameters / GB * bits / 8 if family != "dense"
                  else shape.parameters / GB * DTYPE_BYTES[setting.method], notes=notes)
    cards = [(f"{g} GiB", g * GIB) for g in CARDS_GIB]
    if budget is not None:
        cards.append((f"budget {budget / GIB:.3g} GiB", budget))
    result.fits = {label: peak <= size for label, size in cards}
    return result


# ---------------------------------------------------------------- text


def render(p: Plan) -> str:
    """The human-readable plan: breakdown, comparisons, verdicts."""
    s = p.setting
    lines = [f"{p.model}: {p.parameters:,} parameters; method {s['method']}, task {s['task']}, seq {s['seq']}, "
             f"batch {s['batch']}" + (f", LoRA r={s['rank']}" if s["task"] in ("lora", "qlora") else "")
             + (", gradient checkpointing" if s["grad_checkpointing"] else "")
             + (f", {s['optimizer']}" if s["task"] != "inference" else ""), ""]
    width = max(len(k) for k in p.parts)
    for name, value in p.parts.items():
        lines.append(f"  {name:<{width}}  {value / GIB:9.3f} GiB")
    lines.append(f"  {'predicted peak':<{width}}  {p.peak / GIB:9.3f} GiB"
                 f"   (torch allocated {p.torch_allocated / GIB:.3f} GiB)")
    lines.append("")
    if p.accelerate_estimate is not None:
        lines.append(f"accelerate estimate-memory ({p.accelerate_dtype}, weights only, no LM head): "
                     f"{p.accelerate_estimate / GIB:.3f} GiB")
    billions = p.parameters / GB
    lines.append(f"rule of thumb (bytes/param x {billions:.3g}B params): {p.rule_of_thumb:.2f} GB"
                 f"   (seed: 4X GB fp32 = {4 * billions:.2f} GB, 2X GB bf16 = {2 * billions:.2f} GB)")
    lines.append("")
    lines.append("fits: " + "  ".join(f"{card} {'yes' if ok else 'NO'}" for card, ok in p.fits.items()))
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def fit_table(models, settings) -> list[dict]:
    """Rows {model, method, task, peak_GiB, fits...} for the report's fit table."""
    rows = []
    for model in models:
        for setting in settings:
            try:
                p = plan(model, setting)
            except PlanError:
                continue
            rows.append({"model": p.model, "method": setting.method, "task": setting.task,
                         "peak_GiB": round(p.peak_gib, 2), **p.fits})
    return rows
