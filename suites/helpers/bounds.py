"""Agreement bounds between the reference and a library that more than one suite holds it to."""

from __future__ import annotations

#: The reference's LLM.int8 mixed matmul (``scalellm.quant.int8.mixed_precision_matmul``, outlier
#: weights dequantized) vs bnb's ``Linear8bitLt`` forward, as max |dY| / max |Y|. Both round the
#: int8 part to fp16 and then the sum (half an ulp each, ulp <= 2^-10 |y|); bnb's CPU
#: int8_mm_dequant multiplies by 6.200124e-05 (1.8e-5 above 1/127^2) and sums in another float32
#: order, far below an ulp. Two fp16 ulps of the largest output: 2^-9. Measured on CPU: 5.9e-4 (one ulp).
MATMUL_MAX_REL_DIFF = 2.0**-9
