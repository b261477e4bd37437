"""Peak-memory cases, run in a child process by :class:`suites.helpers.isolation.Worker`.

Each function is one whole case: it builds what it measures, measures it with :mod:`scalellm.memory`,
frees what it built and returns a plain dict of every figure the test asserts on. The test modules
keep the cases' parameters, tolerances, figures and assertions; here is only the measuring. The
functions take plain arguments (names and numbers) and import torch and the libraries inside, so
the child imports nothing it does not use; they never call ``pytest.skip`` (the test checks for
its packages with ``need`` before it sends a case here).

- :func:`inference_peak` / :func:`qlora_step_peak`: the planner's validation
  (``suites/planner/test_validation.py``): a random-weight shape fixture on cuda, its linears
  quantized as transformers' bitsandbytes integration does, the peak of one prefill or of the
  second QLoRA step;
- :func:`qlora_steps_under_cap`: the memory ceilings of consumer cards
  (``suites/lora/test_ceilings.py``): a 4-bit base, QLoRA steps under a per-process cap;
- :func:`allocation_peak`: the smallest case, a known allocation (``suites/harness/test_isolation.py``).
"""

from __future__ import annotations

import functools
import random

from scalellm import memory, planner


def _reseed() -> None:
    """What the root conftest's ``seed`` fixture does before every test, done in the child: a case
    draws the same weights and tokens as when it ran in the test's own process."""
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _fresh() -> None:
    """Collect, give cached blocks back and reset the peak: a measurement starts at what is held."""
    memory.free("cuda")
    memory.reset_peak("cuda")


# ---------------------------------------------------------------- the planner's validation (cuda)


def quantize_linears(model, method: str):
    """Swap every ``nn.Linear`` but the output embeddings for bnb's module, as transformers'
    ``replace_with_bnb_linear`` does, quantizing the existing (random) weights on the GPU."""
    import bitsandbytes as bnb
    import torch

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
    _fresh()
    return model


def _peaks(held: int) -> dict:
    """The figures of a phase that began with :func:`_fresh` and ``held`` bytes allocated (bytes)."""
    import torch

    return {"held": held, "peak": memory.peak_bytes("cuda"), "reserved": int(torch.cuda.max_memory_reserved())}


def inference_peak(model_name: str, method: str, seq: int, batch: int) -> dict:
    """Peak of one prefill of the whole context (``use_cache=True``, ``logits_to_keep=1``):
    ``{"held": allocated before it, "peak": max_memory_allocated, "reserved": max_memory_reserved}``."""
    import torch

    _reseed()
    model = build(model_name, method)
    ids = torch.randint(model.config.vocab_size, (batch, seq), device="cuda")
    _fresh()
    held = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    result = _peaks(held)
    del out, ids, model
    memory.free("cuda")
    return result


def _train_step(model, optimizer, ids) -> float:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def qlora_step_peak(model_name: str, method: str, seq: int, batch: int, checkpointing: bool, rank: int) -> dict:
    """Peak of the second training step (forward, backward, AdamW step) of peft LoRA of ``rank`` on all
    linears, so the optimizer states exist, as in every later step; the keys of :func:`inference_peak`."""
    import peft
    import torch

    _reseed()
    model = build(model_name, method)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(model.config.vocab_size, (batch, seq), device="cuda")
    _train_step(model, optimizer, ids)  # creates the optimizer states; every later step looks like the second
    _fresh()
    held = torch.cuda.memory_allocated()
    _train_step(model, optimizer, ids)
    result = _peaks(held)
    del optimizer, params, ids, model
    memory.free("cuda")
    return result


# ---------------------------------------------------------------- ceilings of consumer cards (cuda)


def _lora_steps(base, config, vocab: int, device: str) -> None:
    """Attach LoRA, build the paged 8-bit optimizer and run ``config.steps`` steps on random tokens."""
    import torch

    from scalellm import train

    model = train.add_lora(base, config)
    optimizer, _ = train.make_optimizer([p for p in model.parameters() if p.requires_grad], config, device)
    x = torch.randint(0, vocab, (config.batch_size, config.seq_len), device=device)
    try:
        train.train_steps(model, optimizer, [x] * config.steps, device)
    finally:
        for p in model.parameters():
            p.grad = None  # an OOM mid-backward must not leave gradients on the injected adapters


def qlora_steps_under_cap(shape: str, seq: int, rank: int, batch: int, card_gib: float, steps: int,
                          device: str = "cuda") -> dict:
    """``steps`` QLoRA steps (r=``rank``, alpha 2r, bf16 compute, paged 8-bit AdamW, gradient
    checkpointing) of a random NF4+DQ ``shape`` base under the cap of a ``card_gib`` GiB card (bytes):

    ``cap_bytes`` (:func:`scalellm.memory.card_cap_bytes`), ``base_bytes`` (allocated once the base is
    built), ``peak_bytes``, ``fit`` and ``error`` (:func:`scalellm.memory.measure`: an OOM is a result),
    ``after`` (allocated once the case is freed) and ``held`` (what the model itself holds then: the
    4-bit base, the injected adapters, the embeddings, norms and lm_head upcast to float32).
    """
    import torch

    from scalellm import load, train

    _reseed()
    config = train.TrainConfig(rank=rank, alpha=2 * rank, steps=steps, batch_size=batch, seq_len=seq,
                               compute_dtype="bfloat16", optimizer="paged_adamw_8bit", gradient_checkpointing=True)
    base = train.random_qlora_base(shape, device, config.compute_dtype)  # before the cap, directly in 4-bit
    memory.free(device)
    base_bytes = torch.cuda.memory_allocated()
    cap = memory.card_cap_bytes(card_gib)
    # measure() frees, resets the peak and applies the cap with memory.cuda_cap (in this process)
    result = memory.measure(functools.partial(_lora_steps, base, config, base.config.vocab_size, device), device, cap)
    memory.free(device)
    after = torch.cuda.memory_allocated()
    held = sum(load.held_bytes(base).values())
    del base
    memory.free(device)
    return {"cap_bytes": cap, "base_bytes": base_bytes, "peak_bytes": result.peak_bytes, "fit": result.fit,
            "error": result.error, "after": after, "held": held}


# ---------------------------------------------------------------- a known allocation (harness)


def allocation_peak(device: str, nbytes: int) -> dict:
    """Reset the peak, allocate ``nbytes`` (written, so resident on cpu) and read the peak back (bytes):
    ``{"before": allocated (cuda) or resident (cpu) at the reset, "peak": the peak after the allocation}``.

    cpu: the process's peak RSS (``VmHWM``; ``None`` where this OS cannot reset it, see
    :func:`scalellm.memory.rss_peak_resettable`), with numpy only: the child stays small.
    cuda: ``torch.cuda.max_memory_allocated``.
    """
    if device == "cpu":
        import numpy as np

        if not memory.rss_peak_resettable() or not memory.reset_cpu_peak():
            return {"before": None, "peak": None}
        before = memory.cpu_peak_bytes()  # just reset: the current RSS
        block = np.ones(nbytes, dtype=np.uint8)  # ones, not zeros: every page written, so resident
        peak = memory.cpu_peak_bytes()
        del block
        return {"before": before, "peak": peak}
    if not device.startswith("cuda"):
        raise ValueError(f"no resettable peak on {device}")
    import torch

    memory.free(device)
    memory.reset_peak(device)
    before = int(torch.cuda.memory_allocated())
    block = torch.ones(nbytes, dtype=torch.uint8, device=device)
    peak = memory.peak_bytes(device)
    del block
    memory.free(device)
    return {"before": before, "peak": peak}
