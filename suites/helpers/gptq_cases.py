"""The cases of the GPTQ suites: the calibration and evaluation budgets, the decoder layers
quantized, each quantization's spec and the library's settings (the fixtures that run them live in
suites/gptq/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from scalellm import gptq_library, quality

#: Calibration: 16 sequences of 128 tokens = 2,048 tokens. The paper uses 128 x 2,048 tokens of C4
#: (§5); that costs minutes per forward pass on 2 CPU cores. 2,048 tokens already give every
#: Hessian full rank (the widest input, down_proj, has 1,536 columns) and, measured here, GPTQ's
#: advantage over RTN on every layer.
CALIB_SEQUENCES = 16
CALIB_LENGTH = 128
#: Decoder layers quantized in the real-model runs: every 6th of SmolLM2's 30, spread over depth.
#: All 30 cost ~10 min per configuration here (measured: ~4 s of column loop per layer plus two
#: layer passes over the calibration tokens, on 2 busy cores); five keep the suite in budget, and
#: quantizing a fifth of the layers still moves KLD far above fp32's noise. ``None`` = all.
QUANT_LAYERS = (0, 6, 12, 18, 24)
#: Evaluation: two windows of 512 tokens (quality.WINDOW) of the evaluation corpus.
EVAL_TOKENS = 1024
WINDOW = quality.WINDOW


@dataclass(frozen=True)
class Spec:
    """One quantization of the real model's decoder linears."""

    method: str  # "gptq" | "rtn" (scalellm.quant.gptq.quantize_model)
    bits: int
    group_size: int = 128
    sym: bool = True  # GPTQModel's and transformers GPTQConfig's default
    act_order: bool = False  # GPTQConfig's default desc_act=False

    @property
    def name(self) -> str:
        """Method name in the cross-method table: ``gptq-4bit-g128``."""
        return f"{self.method}-{self.bits}bit-g{self.group_size}{'-act' if self.act_order else ''}"


#: The library's run: the settings of the reference's 4-bit row (test_quality's ``Spec("gptq", 4)``:
#: symmetric, group 128, no act-order, damp 1 %) on the same decoder layers and calibration tokens.
LIBRARY_SETTINGS = gptq_library.Settings(bits=4, group_size=128, sym=True, desc_act=False, layers=QUANT_LAYERS)
#: Its row in the cross-method table (speed figures): the library, not the reference.
LIBRARY_METHOD = "gptqmodel-4bit-g128"
