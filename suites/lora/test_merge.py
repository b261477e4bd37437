"""Merge: a QLoRA adapter merged into the *dequantized* base computes base + adapter (the claim:
"adapters load with no degradation and merge into a dequantized model"), and the known bnb+peft bug of
merging into a 4-bit base after an inference forward on AVX512-BF16 CPUs
(docs/evidence.md: bnb 4-bit repack breaks a later merge)."""

from __future__ import annotations

import pytest

from scalellm import lora_math, train
from scalellm.baselines import Tolerance
from scalellm.load import load
from suites.helpers.bnb_paths import repacks_4bit_on_cpu
from suites.helpers.lora_runs import config_for

pytestmark = [pytest.mark.lora, pytest.mark.nf4, pytest.mark.reference]

#: Merged vs unmerged on the fp32 dequantized base: (W + s*B@A) x vs W x + s*B@(A x) differ only by
#: fp32 rounding order (eps 1.2e-7) through 30 layers; a merge into an fp32 copy measured 9.5e-5 max
#: |dlogit| (docs/evidence.md: bnb 4-bit repack breaks a later merge); 10x that.
MERGE_ATOL = 1e-3
#: The 4-bit model (+adapter) vs the dequantized dense base (+adapter): the same weights, so only
#: the compute path differs (bnb dequantizes to the compute dtype and multiplies). fp32 compute:
#: rounding only -> 1e-3 as above; bf16 compute: bf16 has 8 mantissa bits (eps 7.8e-3), and the
#: rounding compounds over 30 layers: measured max |dlogit| 1.42 and top-1 31/32 on the H100
#: (bnb 0.50.2, torch 2.11, one held-out block of 64 tokens) -> 2.0 and 90%.
PATH_ATOL = {"float32": 1e-3, "bfloat16": 2.0}
PATH_MIN_TOP1 = {"float32": 1.0, "bfloat16": 0.9}
#: Top-1 agreement of a merge into the 4-bit base with the dense base + adapter. Merging requantizes
#: W + s*B@A to NF4: measured 54% top-1 without a prior forward (SmolLM2's weights already sit on a Q4_1
#: grid, so requantization moves many); the bug gives 0% (docs/evidence.md: bnb 4-bit repack breaks a
#: later merge). 25% separates the two.
MIN_4BIT_MERGE_TOP1 = 0.25


@pytest.fixture
def merged_setup(trained, checkpoint, device, tmp_path):
    """(adapter dir, held-out batch, dense dequantized base, fresh 4-bit base) for ``device``."""
    model, tokenizer, _ = trained
    model.save_pretrained(tmp_path)
    cfg = config_for(device)
    qbase, _ = train.load_base(checkpoint, cfg, device)
    dense, _ = load(checkpoint, "fp32", device)
    assert lora_math.dequantize_into(dense, qbase) > 0
    x = train.split_data(tokenizer, cfg)[1][:1].to(device)  # (1, seq)
    return tmp_path, x, dense, qbase


def test_merge_into_dequantized_base_equals_base_plus_adapter(merged_setup, device, record_metric):
    import torch
    from peft import PeftModel

    adapter, x, dense, _ = merged_setup
    peft_dense = PeftModel.from_pretrained(dense, adapter).eval()
    with torch.no_grad():
        unmerged = peft_dense(input_ids=x).logits
        merged = peft_dense.merge_and_unload()(input_ids=x).logits
    delta = (merged - unmerged).abs().max().item()
    record_metric("merge_max_abs_dlogit", delta, unit="logit", better="lower",
                  tolerance=Tolerance(abs=MERGE_ATOL, why="fp32 rounding-order differences"))
    assert delta <= MERGE_ATOL


def test_qlora_model_equals_dequantized_base_plus_adapter(trained, merged_setup, device, record_metric):
    """No degradation on reload into dense: the 4-bit model and its dequantized twin, same adapter."""
    import torch
    from peft import PeftModel

    model, _, _ = trained
    adapter, x, dense, _ = merged_setup
    peft_dense = PeftModel.from_pretrained(dense, adapter).eval()
    q = train.no_repack_forward(model, x).logits.float()  # the path training used (no CPU repack)
    with torch.no_grad():
        d = peft_dense(input_ids=x).logits.float()
    delta = (q - d).abs().max().item()
    atol = PATH_ATOL[config_for(device).compute_dtype]
    record_metric("qlora_vs_dense_max_abs_dlogit", delta, unit="logit", better="lower",
                  tolerance=Tolerance(abs=atol, why="compute-path rounding in the compute dtype"))
    assert delta <= atol
    top1 = (q.argmax(-1) == d.argmax(-1)).float().mean().item()
    assert top1 >= PATH_MIN_TOP1[config_for(device).compute_dtype], f"top-1 agreement {top1:.1%}"


# The live bug (docs/evidence.md: bnb 4-bit repack breaks a later merge; bnb 0.50.2 + peft 0.21):
# Linear4bit.forward repacks its weight into a CPU-specific layout on the first inference forward when
# the CPU has AVX512-BF16; peft's merge then dequantizes the repacked bytes as if canonical. Elsewhere
# (CUDA, CPUs without AVX512-BF16) the merge is only requantization loss. The day bnb or peft fixes it,
# the strict xfail turns into a failure.
_REPACKS = repacks_4bit_on_cpu()


_REASON = ("bnb 0.50.2 repacks Linear4bit weights on the first inference forward on AVX512-BF16 CPUs; "
           "peft merge_and_unload then dequantizes the repacked bytes "
           "(docs/evidence.md: bnb 4-bit repack breaks a later merge)")


def test_merge_into_4bit_base_after_inference_forward(merged_setup, device, request):
    import torch
    from peft import PeftModel

    if device == "cpu" and _REPACKS:  # the repacking only happens for CPU tensors on such CPUs
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=_REASON))
    adapter, x, dense, qbase = merged_setup
    peft_dense = PeftModel.from_pretrained(dense, adapter).eval()
    peft_q = PeftModel.from_pretrained(qbase, adapter).eval()
    with torch.no_grad():
        want = peft_dense(input_ids=x).logits.argmax(-1)
        peft_q(input_ids=x)  # one inference forward: triggers the repacking on AVX512-BF16 CPUs
        got = peft_q.merge_and_unload()(input_ids=x).logits.argmax(-1)
    top1 = (got == want).float().mean().item()
    assert top1 >= MIN_4BIT_MERGE_TOP1, f"top-1 agreement {top1:.1%} after merging into the 4-bit base"
