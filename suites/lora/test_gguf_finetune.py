"""A common claim: "GGUF models can't be fine-tuned". Today's truth, measured (transformers 5.24, peft 0.21):

- transformers loads a GGUF (``gguf_file=``) by *dequantizing* every tensor: the model is dense float32
  (no 4-bit storage survives), with a ``GgufHfQuantizer`` attached;
- on that dense model peft LoRA trains (loss falls) and the adapter saves;
- but the fine-tuned (merged) model cannot be saved: ``save_pretrained`` refuses ("quantized with gguf
  and is not serializable"), and transformers has no GGUF writer.

So: fine-tunable as a dense model, not as a quantized one, and not exportable as loaded. Each fact is
one test; the day one changes, its test fails and says so.
"""

from __future__ import annotations

import pytest

from scalellm import train
from suites.helpers.packages import need
from suites.helpers.lora_runs import OVERFIT_CONFIG, overfit_losses

pytestmark = [pytest.mark.lora, pytest.mark.gguf]

#: A repeated batch's loss must fall by at least this (nats) in OVERFIT_CONFIG.steps steps; measured
#: drops are several times larger (cpu, N=1); 0.1 only says "the adapters learn".
MIN_OVERFIT_DROP = 0.1


@pytest.fixture(scope="module")
def gguf_model():
    """(model loaded with gguf_file=, tokenizer): about 15-20 s on 2 cores
    (docs/evidence.md: SmolLM2 loads from GGUF)."""
    need("gguf")
    need("peft")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scalellm.models import ModelNotFound, smollm2_gguf

    try:
        path = smollm2_gguf()
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def gguf_lora(gguf_model):
    """LoRA on the GGUF-loaded model, trained on one repeated batch -> (peft model, losses)."""
    model, tokenizer = gguf_model
    peft_model = train.add_lora(model, OVERFIT_CONFIG)
    return peft_model, overfit_losses(peft_model, tokenizer, "cpu")


def test_gguf_load_is_dense_float32(gguf_model):
    import torch

    model, _ = gguf_model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any("Params4bit" in type(p).__name__ or "Int8" in type(p).__name__ for p in model.parameters())
    assert type(model.hf_quantizer).__name__ == "GgufHfQuantizer"


def test_lora_trains_on_gguf_loaded_model(gguf_lora):
    _, losses = gguf_lora
    assert losses[0] - losses[-1] >= MIN_OVERFIT_DROP, losses


def test_adapter_of_gguf_model_saves(gguf_lora, tmp_path):
    peft_model, _ = gguf_lora
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size > 0


def test_merged_gguf_model_cannot_be_saved(gguf_lora, tmp_path):
    """Today's truth: the merge works, saving the merged model refuses (the gguf quantizer)."""
    peft_model, _ = gguf_lora
    merged = peft_model.merge_and_unload()  # last user of the module fixture: merging is in place
    with pytest.raises(ValueError, match="not serializable"):
        merged.save_pretrained(tmp_path)
