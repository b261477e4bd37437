"""Serialization of quantized models: save_pretrained, reload, and get the same packed weights,
the same quantization constants and the same logits."""

from __future__ import annotations

import pytest

from scalellm import load
from suites.helpers.packages import need
from suites.helpers.methods import COMPUTE_DTYPE, method_params

pytestmark = [pytest.mark.quality]

#: One 8-bit and two 4-bit methods (with and without double quant: their saved states differ).
SAVED_METHODS = ("int8", "nf4", "nf4-dq")
#: Tokens of the logits check: one short window is enough to exercise every layer.
LOGIT_TOKENS = 64


def _fresh(path, method_name, device):
    """A model loaded for this test alone: never run forward before saving, because a 4-bit CPU
    forward may repack weights in place on AVX512-BF16 machines
    (docs/evidence.md: bnb 4-bit repack breaks a later merge)."""
    return load.load(path, method_name, device, COMPUTE_DTYPE)[0]


@pytest.fixture
def saved_pair(request, device, checkpoint, tmp_path):
    method_name = request.param
    need("bitsandbytes")
    original = _fresh(checkpoint.path, method_name, device)
    before = {k: v.detach().clone() for k, v in original.state_dict().items()}
    original.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = _fresh(tmp_path, method_name, device)
    return original, before, reloaded


@pytest.mark.parametrize("saved_pair", method_params(SAVED_METHODS), indirect=True)
def test_reload_gives_identical_packed_weights_and_constants(saved_pair):
    """Every tensor of the state dict (packed weights, absmax, nested absmax, code tables, SCB) survives a round trip."""
    import torch

    _, before, reloaded = saved_pair
    after = reloaded.state_dict()
    assert sorted(after) == sorted(before)
    different = [k for k in before if before[k].dtype != after[k].dtype or before[k].shape != after[k].shape
                 or not torch.equal(before[k].cpu(), after[k].cpu())]
    assert not different, f"{len(different)} tensors differ after save/reload, e.g. {different[:5]}"


@pytest.mark.parametrize("saved_pair", method_params(SAVED_METHODS), indirect=True)
def test_reload_gives_identical_logits(saved_pair, device, corpus):
    """The reloaded model computes exactly the original's logits."""
    import torch

    original, _, reloaded = saved_pair
    x = torch.tensor([corpus.ids[:LOGIT_TOKENS]], device=device)
    with torch.inference_mode():
        a = original(input_ids=x).logits
        b = reloaded(input_ids=x).logits
    assert torch.equal(a, b), f"max |Δlogit| {float((a - b).abs().max()):.3g}"
