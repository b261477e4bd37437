"""The planner against the measured CUDA peak: inference and QLoRA over the shape fixtures.

Each case builds a random-weight model of a shape fixture on the GPU, quantizes its linears the way
transformers' bitsandbytes integration does (every ``nn.Linear`` but ``lm_head`` becomes a bnb
``Linear4bit`` / ``Linear8bitLt``), and measures ``torch.cuda.max_memory_allocated`` over

- inference: one prefill of the whole context (``use_cache=True``, ``logits_to_keep=1``);
- qlora: the second training step (forward, backward, AdamW step) of peft LoRA on all linears,
  so the optimizer states exist, as in every later step.

It compares that with the planner's ``torch_allocated`` (the planner's peak less the CUDA context and
allocator slack, which ``max_memory_allocated`` does not see). Target: within 10% (issue 8); the
signed relative error of each case is recorded as a figure, so a library upgrade that moves the
measured peak shows as a changed error.
"""

from __future__ import annotations

import gc

import pytest

from scalellm import planner
from scalellm.baselines import Tolerance
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


# ---------------------------------------------------------------- building (torch.cuda only in here)


def quantize_linears(model, method: str):
    """Swap every ``nn.Linear`` but the output embeddings for bnb's module, as transformers'
    ``replace_with_bnb_linear`` does, quantizing the existing (random) weights on the GPU."""
    import torch

    bnb = need("bitsandbytes")
    output = model.get_output_embeddings()
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not output]
    for name, linear in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        bias = linear.bias is not None
        if method == "int8":
            new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
        else:
            quant_type = method.removesuffix("-dq")
            new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias,
                                    compute_dtype=torch.bfloat16, compress_statistics=method.endswith("-dq"),
                                    quant_type=quant_type)
            new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=planner.BLOCKSIZE_4BIT,
                                           compress_statistics=method.endswith("-dq"), quant_type=quant_type)
        if bias:
            new.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        new = new.to("cuda")  # quantizes
        setattr(parent, name.rsplit(".", 1)[-1], new)
        del linear
    return model


def build(model_name: str, method: str):
    """A random-weight model of ``model_name`` on cuda, held as ``method`` says."""
    import torch

    from scalellm import shapes

    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(method, torch.bfloat16)
    model = shapes.random_model(model_name, dtype=dtype, device="cuda")
    if method not in planner.DTYPE_BYTES:
        quantize_linears(model, method)
    fresh()
    return model


def fresh():
    import torch

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def measure_inference(model, seq: int, batch: int) -> dict:
    import torch

    ids = torch.randint(model.config.vocab_size, (batch, seq), device="cuda")
    fresh()
    held = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    result = {"held": held, "peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    del out
    return result


def check_prediction(record_metric, case: str, predicted: float, measured: dict, held_when: str) -> None:
    """Record the relative error of a predicted peak and hold it to TARGET_REL_ERROR."""
    error = predicted / measured["peak"] - 1.0
    record_metric("peak_rel_error", error, unit="1", better="equal", tolerance=ERROR_DRIFT)
    record_metric("measured_peak_GiB", measured["peak"] / planner.GIB, unit="GiB", better="lower",
                  tolerance=Tolerance(rel=0.05, why="same stack, same shapes: the peak moves only with a library"))
    assert abs(error) <= TARGET_REL_ERROR, (
        f"{case}: predicted {predicted / planner.GIB:.3f} GiB, measured {measured['peak'] / planner.GIB:.3f} GiB "
        f"({error:+.1%}); {held_when} {measured['held'] / planner.GIB:.3f} GiB")


def measure_qlora(model, seq: int, batch: int, checkpointing: bool, rank: int = LORA_RANK) -> dict:
    import torch

    peft = need("peft")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step()  # the first step creates the optimizer states; every later step looks like the second
    fresh()
    held = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    result = {"held": held, "peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    del optimizer, params
    return result


def _free(*objects):
    import torch

    del objects
    gc.collect()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------- the cases


@pytest.mark.parametrize("model_name,method,seq,batch", INFERENCE_CASES)
def test_inference_peak_is_predicted_within_target(device, record_metric, model_name, method, seq, batch):
    need("bitsandbytes") if method not in planner.DTYPE_BYTES else None
    predicted = planner.plan(model_name, planner.Setting(method, "inference", seq=seq, batch=batch)).torch_allocated
    model = build(model_name, method)
    measured = measure_inference(model, seq, batch)
    _free(model)
    check_prediction(record_metric, f"{model_name} {method} inference seq {seq} batch {batch}", predicted,
                     measured, "held before the prefill")


@pytest.mark.lora
@pytest.mark.nf4
@pytest.mark.parametrize("model_name,method,seq,batch,checkpointing", QLORA_CASES)
def test_qlora_step_peak_is_predicted_within_target(device, record_metric, model_name, method, seq, batch,
                                                    checkpointing):
    need("bitsandbytes")
    need("peft")
    setting = planner.Setting(method, "qlora", seq=seq, batch=batch, rank=LORA_RANK,
                              grad_checkpointing=checkpointing)
    predicted = planner.plan(model_name, setting).torch_allocated
    model = build(model_name, method)
    measured = measure_qlora(model, seq, batch, checkpointing)
    _free(model)
    check_prediction(record_metric, f"{model_name} {method} qlora seq {seq} batch {batch} ckpt {checkpointing}",
                     predicted, measured, "held before the step")
