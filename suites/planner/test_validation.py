"""The planner against the measured CUDA peak: inference and QLoRA over the shape fixtures.

Each case builds a random-weight model of a shape fixture on the GPU, quantizes its linears the way
transformers' bitsandbytes integration does (every ``nn.Linear`` but ``lm_head`` becomes a bnb
``Linear4bit`` / ``Linear8bitLt``), and measures ``torch.cuda.max_memory_allocated`` over

- inference: one prefill of the whole context (``use_cache=True``, ``logits_to_keep=1``);
- qlora: the second training step (forward, backward, AdamW step) of peft LoRA on all linears,
  so the optimizer states exist, as in every later step.

The measuring (``suites/helpers/peak_cases.py``) runs in a child process shared by this module's
cases (the ``isolated`` fixture, ``suites/helpers/isolation.py``): the allocator's counters belong
to the process, and in one pytest process with the whole cuda tier what earlier tests left alive
(2.5 GiB before GPT-2's prefill on an H200) counted into every peak.

It compares that with the planner's ``torch_allocated`` (the planner's peak less the CUDA context and
allocator slack, which ``max_memory_allocated`` does not see). Target: within 10% (the planner's accuracy
goal, README: tiers); the signed relative error of each case is recorded as a figure, so a library
upgrade that moves the measured peak shows as a changed error.
"""

from __future__ import annotations

import pytest

from scalellm import planner
from scalellm.baselines import Tolerance
from suites.helpers import peak_cases
from suites.helpers.packages import need

pytestmark = [pytest.mark.memory, pytest.mark.devices("cuda")]

#: Issue 8's acceptance target: predicted peak within 10% of the measured one.
TARGET_REL_ERROR = 0.10
#: How far a case's error may move from its stored baseline before it counts as a change: the
#: allocator is deterministic for a fixed stack, so 2 points is a library or driver change.
ERROR_DRIFT = Tolerance(abs=0.02, why="allocator peaks are deterministic for one stack; 2 points = a change")

# (model, method, seq, batch): inference prefills of the whole context
INFERENCE_CASES = [
    pytest.param("gpt2-124m", "fp32", 1024, 1, marks=pytest.mark.fp),
    pytest.param("smollm2-135m", "bf16", 2048, 4, marks=pytest.mark.fp),
    pytest.param("pythia-410m", "fp16", 2048, 2, marks=pytest.mark.fp),
    pytest.param("tinyllama-1.1b", "bf16", 2048, 4, marks=pytest.mark.fp),
    pytest.param("tinyllama-1.1b", "nf4", 2048, 2, marks=pytest.mark.nf4),
    pytest.param("tinyllama-1.1b", "int8", 1024, 1, marks=pytest.mark.int8),
    pytest.param("llama-2-7b", "bf16", 4096, 1, marks=pytest.mark.fp),
    pytest.param("llama-2-7b", "nf4-dq", 1024, 1, marks=pytest.mark.nf4),
    pytest.param("mistral-7b", "nf4", 4096, 1, marks=pytest.mark.nf4),
]
# (model, method, seq, batch, grad_checkpointing): QLoRA training steps, r=16, AdamW
QLORA_CASES = [
    pytest.param("smollm2-135m", "nf4", 512, 4, False),
    pytest.param("smollm2-135m", "nf4", 1024, 4, True),
    pytest.param("pythia-410m", "nf4", 512, 2, False),
    pytest.param("tinyllama-1.1b", "nf4", 512, 4, False),
    pytest.param("tinyllama-1.1b", "nf4-dq", 1024, 2, True),
    pytest.param("llama-2-7b", "nf4", 512, 1, False),
    pytest.param("llama-2-7b", "nf4", 1024, 2, True),
]
LORA_RANK = 16


def check_prediction(record_metric, case: str, predicted: float, measured: dict, held_when: str) -> None:
    """Record the relative error of a predicted peak and hold it to TARGET_REL_ERROR."""
    error = predicted / measured["peak"] - 1.0
    record_metric("peak_rel_error", error, unit="1", better="equal", tolerance=ERROR_DRIFT)
    record_metric("measured_peak_GiB", measured["peak"] / planner.GIB, unit="GiB", better="lower",
                  tolerance=Tolerance(rel=0.05, why="same stack, same shapes: the peak moves only with a library"))
    assert abs(error) <= TARGET_REL_ERROR, (
        f"{case}: predicted {predicted / planner.GIB:.3f} GiB, measured {measured['peak'] / planner.GIB:.3f} GiB "
        f"({error:+.1%}); {held_when} {measured['held'] / planner.GIB:.3f} GiB")


# ---------------------------------------------------------------- the cases


@pytest.mark.parametrize("model_name,method,seq,batch", INFERENCE_CASES)
def test_inference_peak_is_predicted_within_target(device, record_metric, isolated, model_name, method, seq,
                                                   batch):
    need("bitsandbytes") if method not in planner.DTYPE_BYTES else None
    predicted = planner.plan(model_name, planner.Setting(method, "inference", seq=seq, batch=batch)).torch_allocated
    measured = isolated.run(peak_cases.inference_peak, model_name, method, seq, batch)
    check_prediction(record_metric, f"{model_name} {method} inference seq {seq} batch {batch}", predicted,
                     measured, "held before the prefill")


@pytest.mark.lora
@pytest.mark.nf4
@pytest.mark.parametrize("model_name,method,seq,batch,checkpointing", QLORA_CASES)
def test_qlora_step_peak_is_predicted_within_target(device, record_metric, isolated, model_name, method, seq,
                                                    batch, checkpointing):
    need("bitsandbytes")
    need("peft")
    setting = planner.Setting(method, "qlora", seq=seq, batch=batch, rank=LORA_RANK,
                              grad_checkpointing=checkpointing)
    predicted = planner.plan(model_name, setting).torch_allocated
    measured = isolated.run(peak_cases.qlora_step_peak, model_name, method, seq, batch, checkpointing, LORA_RANK)
    check_prediction(record_metric, f"{model_name} {method} qlora seq {seq} batch {batch} ckpt {checkpointing}",
                     predicted, measured, "held before the step")
