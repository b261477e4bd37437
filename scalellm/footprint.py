"""Predicted bytes a loading method holds, from the architecture alone (no weights are read).

The prediction is first-principles arithmetic over the model's tensors, built on the meta device
(``torch.device("meta")`` allocates nothing), and is meant to agree **to the byte** with
:func:`scalellm.load.held_bytes` of the loaded model:

* dense methods: every distinct parameter at 4 (fp32) or 2 (bf16/fp16) bytes per value;
* LLM.int8 (Dettmers et al. 2022, §3.2 vector-wise quantization): each replaced ``nn.Linear``
  weight at 1 byte per value, plus one float32 scale per output row (bnb ``Int8Params.SCB``);
* 4-bit NF4/FP4 (Dettmers et al. 2023, QLoRA §3): each replaced weight packed two values per byte
  (bnb ``Params4bit``, ``quant_storage=uint8``), plus the block constants whose exact size
  :func:`scalellm.quant.constant_bits_per_parameter` gives (float32 absmax per block of 64; under
  double quant a uint8 code per block, a float32 absmax per block of 256 of those, and one float32
  offset), plus the code tables bnb keeps per layer (16 float32 for NF4/FP4, and under double
  quant the 256-entry float32 dynamic map);
* what the quantizers leave alone — embeddings, norms, ``lm_head`` (the output embedding, which
  transformers' bnb integration never converts), biases — in the compute dtype;
* buffers (rotary ``inv_freq``) as the model creates them: float32 whatever the dtype.

Which layers a quantizer replaces is the one structural rule taken from transformers: every
``nn.Linear`` except the output embedding (``get_keys_to_not_convert``). The test compares the
prediction with the loaded model, so a change of that rule shows up as a byte difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from scalellm.load import BLOCKSIZE_4BIT, CATEGORIES, method
from scalellm.quant import constant_bits_per_parameter

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Entries of bnb's code tables: the 4-bit NF4/FP4 table and the 8-bit dynamic map of double quant.
CODE_ENTRIES_4BIT = 16
CODE_ENTRIES_DQ = 256
CODE_ENTRY_BYTES = 4  # float32
#: int8 row scale: float32 absmax of each output row (bnb ``int8_vectorwise_quant``).
SCB_BYTES = 4


@dataclass(frozen=True)
class Tensor:
    """One distinct parameter or buffer of the architecture."""

    name: str
    numel: int
    shape: tuple[int, ...]
    kind: str  # "linear" (a weight a quantizer replaces), "param" (kept), "buffer"
    buffer_dtype: str = ""  # buffers only: the dtype the model creates them in


def meta_model(config):
    """The causal LM of ``config`` on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def tensors(config) -> list[Tensor]:
    """Distinct parameters (tied ones once) and buffers of ``config``'s model, classified."""
    import torch

    model = meta_model(config)
    output = model.get_output_embeddings()
    replaced = {id(m.weight) for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m is not output}
    out: list[Tensor] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        kind = "linear" if id(p) in replaced else "param"
        out.append(Tensor(name, p.numel(), tuple(p.shape), kind))
    for name, b in model.named_buffers():
        out.append(Tensor(name, b.numel(), tuple(b.shape), "buffer", str(b.dtype).removeprefix("torch.")))
    return out


def parameter_count(config) -> int:
    return sum(t.numel for t in tensors(config) if t.kind != "buffer")


#: bnb's CPU repack stores each 4-bit absmax as bfloat16 (``backends/cpu/ops.py``, fused gemv_4bit).
CPU_PACKED_ABSMAX_BYTES = 2


def _linear_bytes(t: Tensor, weights: str, double_quant: bool, cpu_packed: bool = False) -> dict[str, int]:
    """Bytes of one replaced linear weight under a quantized method (``cpu_packed``: after bnb's CPU repack)."""
    if weights == "int8":
        rows = t.shape[0]  # (out_features, in_features)
        return {"parameters": t.numel, "quant_constants": rows * SCB_BYTES, "code_tables": 0}
    packed = -(-t.numel // 2)  # two 4-bit codes per uint8
    if cpu_packed:  # absmax per block in bf16, DQ undone (its float32 offset stays referenced), 4-bit table only
        blocks = -(-t.numel // BLOCKSIZE_4BIT)
        offset = 4 if double_quant else 0
        return {"parameters": packed, "quant_constants": blocks * CPU_PACKED_ABSMAX_BYTES + offset,
                "code_tables": CODE_ENTRIES_4BIT * CODE_ENTRY_BYTES}
    bits = constant_bits_per_parameter(BLOCKSIZE_4BIT, double_quant, t.numel) * t.numel
    assert bits.denominator == 1 and bits % 8 == 0, bits
    codes = CODE_ENTRIES_4BIT + (CODE_ENTRIES_DQ if double_quant else 0)
    return {"parameters": packed, "quant_constants": int(bits) // 8, "code_tables": codes * CODE_ENTRY_BYTES}


def predict(config, method_name: str, compute_dtype: str = "float32", *, cpu_packed: bool = False) -> dict[str, int]:
    """Predicted :func:`scalellm.load.held_bytes` of ``method_name`` for ``config`` (bytes).

    ``cpu_packed=True``: the layout after bnb's CPU repack of 4-bit layers (first forward on an
    AVX512-BF16 CPU); other methods are unchanged by it.
    """
    m = method(method_name)
    dense = m.weights if not m.quantized else compute_dtype
    out = dict.fromkeys(CATEGORIES, 0)
    for t in tensors(config):
        if t.kind == "buffer":
            out["buffers"] += t.numel * DTYPE_BYTES[t.buffer_dtype]
        elif t.kind == "linear" and m.quantized:
            for k, v in _linear_bytes(t, m.weights, m.double_quant, cpu_packed).items():
                out[k] += v
        else:
            out["parameters"] += t.numel * DTYPE_BYTES[dense]
    return out


def bytes_per_parameter(held: dict[str, int], n_parameters: int) -> Fraction:
    """All bytes held (parameters, buffers, constants, tables) per model parameter."""
    return Fraction(sum(held.values()), n_parameters)


__all__ = ["Tensor", "bytes_per_parameter", "meta_model", "parameter_count", "predict", "tensors"]
