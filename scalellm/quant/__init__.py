"""Pure-numpy references of the quantization formats that QLoRA and LLM.int8 define.

- :func:`codebook` ("nf4", "fp4", "dynamic8"): the code books, derived from their definitions.
- :func:`quantize_4bit` / :func:`dequantize_4bit`: blockwise NF4/FP4 with optional double quant,
  bit-identical to bitsandbytes' CPU codec (see ``blockwise``).
- :func:`constant_bits_per_parameter`: the exact storage cost of the quantization constants.
- ``int8``: LLM.int8 vector-wise quantization and the mixed-precision matmul.
"""

from scalellm.quant.blockwise import QuantState4bit, constant_bits_per_parameter, dequantize_4bit, quantize_4bit
from scalellm.quant.codebooks import codebook
from scalellm.quant.double_quant import DoubleQuantState
from scalellm.quant.int8 import Int8State, mixed_precision_matmul, vectorwise_dequantize, vectorwise_quantize

__all__ = [
    "DoubleQuantState",
    "Int8State",
    "QuantState4bit",
    "codebook",
    "constant_bits_per_parameter",
    "dequantize_4bit",
    "mixed_precision_matmul",
    "quantize_4bit",
    "vectorwise_dequantize",
    "vectorwise_quantize",
]
