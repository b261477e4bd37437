"""LoRA beyond QLoRA: adapters on a dense fp32 or bf16 base and on an LLM.int8 base train (the loss
of a repeated batch falls), and only the adapters train."""

from __future__ import annotations

import dataclasses

import pytest

from scalellm import train
from suites.helpers.lora_runs import OVERFIT_CONFIG, overfit_losses

pytestmark = [pytest.mark.lora, pytest.mark.reference]

#: Required loss drop (nats) on one repeated batch in OVERFIT_CONFIG.steps steps: the adapters must
#: learn; measured drops are several times larger (cpu, N=1 per base).
MIN_OVERFIT_DROP = 0.1


@pytest.mark.parametrize("method", [pytest.param("fp32", marks=pytest.mark.fp),
                                    pytest.param("bf16", marks=pytest.mark.fp),
                                    pytest.param("int8", marks=pytest.mark.int8)])
def test_lora_trains_on_base(checkpoint, device, method):
    cfg = dataclasses.replace(OVERFIT_CONFIG, base_method=method, gradient_checkpointing=False)
    base, tokenizer = train.load_base(checkpoint, cfg, device)
    peft_model = train.add_lora(base, cfg)
    losses = overfit_losses(peft_model, tokenizer, device, cfg)
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())
    assert losses[0] - losses[-1] >= MIN_OVERFIT_DROP, losses
