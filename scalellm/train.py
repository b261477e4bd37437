"""A small, readable QLoRA loop: LoRA adapters through peft on a bitsandbytes NF4 + double-quant base.

The recipe is the one of the QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314):

- §3 "QLoRA": the frozen base holds 4-bit NormalFloat weights with double quantization of the
  block constants; matmuls run in the compute dtype (bfloat16 in the paper; float32 here on CPU);
- §3 "Paged Optimizers": the optimizer state may live in paged (unified) memory, bitsandbytes'
  ``PagedAdamW8bit`` (CUDA only);
- §4 "LoRA on all linear layers": adapters on every linear layer of attention and MLP are what
  match 16-bit full fine-tuning (peft's ``target_modules="all-linear"``, which leaves ``lm_head`` out);
- gradient checkpointing (the paper's recipe through ``peft.prepare_model_for_kbit_training``,
  which also freezes the base and upcasts its non-quantized parameters to float32).

Data: the local instruction set (``scalellm.text.instruction_set``), each example written as
``prompt \\n response <eos>``, concatenated and cut into ``seq_len`` blocks ("packing", no padding so
every token counts). The first ``train_examples`` examples train, the next ``heldout_examples``
measure held-out loss; they never share a block.

:func:`run` (and :func:`qlora`, which loads the base first) returns losses, step times and the peak
memory (``scalellm.memory``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

from scalellm import memory

#: peft's shorthand for "every nn.Linear / bnb linear except the output layer" (QLoRA §4).
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one QLoRA run depends on; two equal configs on one device give equal losses."""

    rank: int = 8  # LoRA rank r (QLoRA used 64 on 7B+; 8 is enough to move a 135M model)
    alpha: int = 16  # LoRA scaling alpha; the update is (alpha / r) * B @ A (Hu et al. 2021, §4.1)
    dropout: float = 0.0  # LoRA dropout; 0 keeps runs bit-repeatable (QLoRA used 0.05-0.1)
    target_modules: str | tuple[str, ...] = ALL_LINEAR  # which linears get adapters
    steps: int = 10  # optimizer steps
    batch_size: int = 2  # sequences per step
    seq_len: int = 64  # tokens per sequence (packed blocks)
    lr: float = 1e-3  # AdamW learning rate, constant (docs/evidence.md: QLoRA step on CPU)
    weight_decay: float = 0.0  # AdamW weight decay on the adapters
    optimizer: str = "adamw"  # "adamw" (torch) or "paged_adamw_8bit" (bnb, CUDA only)
    compute_dtype: str = "float32"  # dtype of activations and 4-bit matmuls: "float32" | "bfloat16"
    base_method: str = "nf4-dq"  # scalellm.load method of the frozen base (QLoRA: NF4 + double quant)
    gradient_checkpointing: bool = True  # recompute activations in backward (QLoRA recipe)
    seed: int = 0  # seeds adapter init and batch order
    train_examples: int = 48  # instruction examples used for training
    heldout_examples: int = 16  # the following examples, for held-out loss


@dataclass
class TrainResult:
    """What a run measured. Times in seconds, memory in bytes."""

    config: dict
    losses: list[float]  # training loss of each step (before that step's update)
    step_seconds: list[float]  # wall time of each step (forward + backward + optimizer)
    heldout_before: float  # mean held-out loss before training
    heldout_after: float  # mean held-out loss after training
    peak_bytes: int  # peak memory of the training steps (see scalellm.memory.peak_bytes)
    tokens_per_step: int
    trainable_parameters: int
    optimizer: str  # the optimizer that actually ran (a fallback is visible here)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- data


def packed_blocks(tokenizer, examples: list[dict], seq_len: int):
    """Token blocks ``(n_blocks, seq_len)`` of ``prompt\\nresponse<eos>`` texts, concatenated.

    The tail shorter than ``seq_len`` is dropped (no padding, so no attention masks are needed).
    """
    import torch

    ids: list[int] = []
    eos = tokenizer.eos_token or ""
    for e in examples:
        ids += tokenizer(f"{e['prompt']}\n{e['response']}{eos}", add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens make no block of {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, seq_len)


def split_data(tokenizer, config: TrainConfig):
    """(train blocks, held-out blocks) from the local instruction set."""
    from scalellm.text import instruction_set

    examples, _ = instruction_set(config.train_examples + config.heldout_examples)
    train = packed_blocks(tokenizer, examples[: config.train_examples], config.seq_len)
    heldout = packed_blocks(tokenizer, examples[config.train_examples:], config.seq_len)
    return train, heldout


def batches(blocks, config: TrainConfig):
    """``config.steps`` batches ``(batch_size, seq_len)``: a seeded permutation of the blocks, cycled."""
    import torch

    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(blocks.shape[0], generator=g)
    for step in range(config.steps):
        idx = [order[(step * config.batch_size + i) % len(order)] for i in range(config.batch_size)]
        yield blocks[torch.stack(idx)]


# ---------------------------------------------------------------- model


def prepare_base(model, config: TrainConfig):
    """Freeze the base as training expects it: ``prepare_model_for_kbit_training`` for quantized
    bases (it also upcasts the non-quantized parameters, embeddings, norms and ``lm_head``, to
    float32), plain freezing otherwise; gradient checkpointing as configured. An adapter reloaded
    for inference must sit on a base prepared the same way to compute the same logits."""
    from peft import prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # freezes the base, upcasts non-quantized parameters to float32, enables checkpointing
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def add_lora(model, config: TrainConfig):
    """:func:`prepare_base` + peft LoRA -> a ``PeftModel``.

    The adapter's B starts at zero (peft's default, Hu et al. 2021 §4.1), so the wrapped model
    computes exactly what the base computes until the first update.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    model = prepare_base(model, config)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # A is drawn from torch's global generator (kaiming uniform)
    return get_peft_model(model, lora)


def make_optimizer(params, config: TrainConfig, device: str):
    """(optimizer, name): torch AdamW, or bnb ``PagedAdamW8bit`` where paging exists (CUDA).

    Paged optimizers page their state through CUDA unified memory (QLoRA §3); off CUDA the run falls
    back to torch AdamW, and the returned name says so.
    """
    import torch

    if config.optimizer == "paged_adamw_8bit" and device.startswith("cuda"):
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay), "paged_adamw_8bit"
    if config.optimizer not in ("adamw", "paged_adamw_8bit"):
        raise ValueError(f"unknown optimizer {config.optimizer!r}")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay), "adamw"


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- loop


def no_repack_forward(model, x, **kwargs):
    """A gradient-free forward that leaves bnb's 4-bit weights in their canonical layout.

    bnb 0.50's ``Linear4bit.forward`` repacks its weight for an AVX512-BF16 CPU kernel on the first
    forward that is in eval mode *and* has no grad (``packing_format_for_cpu``). After that every
    forward, training ones included, runs ``gemv_4bit``: bf16 arithmetic whatever the compute dtype,
    and no autograd kernel, so backward through the base weights is silently dropped (torch warns
    "an autograd kernel was not registered"). Evaluating in train mode under ``no_grad`` avoids the
    repack; it equals eval mode when the model has no active dropout, which ``TrainConfig.dropout=0``
    and the Llama-family configs (attention dropout 0) give.
    """
    import torch

    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            return model(input_ids=x, **kwargs)
    finally:
        model.train(was_training)


def mean_loss(model, blocks, batch_size: int) -> float:
    """Token-weighted mean next-token loss over ``blocks`` (every block has the same length)."""
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        x = blocks[i: i + batch_size].to(device)
        total += no_repack_forward(model, x, labels=x).loss.float().item() * x.shape[0]
    return total / blocks.shape[0]


def train_steps(model, optimizer, batch_iter, device: str) -> tuple[list[float], list[float]]:
    """The bare loop: forward with labels (shifted cross-entropy inside the model), backward, step.

    Returns (losses, step seconds). CUDA work is synchronized before each clock read.
    """
    losses, seconds = [], []
    model.train()
    for batch in batch_iter:
        x = batch.to(device)
        memory.synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {len(losses)}")
    return losses, seconds


def run(peft_model, tokenizer, config: TrainConfig, device: str = "cpu", *, heldout: bool = True) -> TrainResult:
    """Train an already-wrapped ``peft_model`` for ``config.steps`` steps and measure it.

    The held-out passes use :func:`no_repack_forward`, so they do not change the training steps.
    """
    train_blocks, heldout_blocks = split_data(tokenizer, config)
    before = mean_loss(peft_model, heldout_blocks, config.batch_size) if heldout else math.nan
    optimizer, opt_name = make_optimizer([p for p in peft_model.parameters() if p.requires_grad], config, device)
    memory.reset_peak(device)
    losses, seconds = train_steps(peft_model, optimizer, batches(train_blocks, config), device)
    peak = memory.peak_bytes(device)
    after = mean_loss(peft_model, heldout_blocks, config.batch_size) if heldout else math.nan
    notes = [] if opt_name == config.optimizer else [f"{config.optimizer} needs CUDA; ran {opt_name}"]
    return TrainResult(config=asdict(config), losses=losses, step_seconds=seconds, heldout_before=before,
                       heldout_after=after, peak_bytes=peak, tokens_per_step=config.batch_size * config.seq_len,
                       trainable_parameters=trainable_parameters(peft_model), optimizer=opt_name, notes=notes)


def load_base(checkpoint, config: TrainConfig, device: str = "cpu"):
    """(frozen quantized base, tokenizer) of a local checkpoint, loaded by ``scalellm.load``."""
    from transformers import AutoTokenizer

    from scalellm.load import load

    model, _ = load(checkpoint, config.base_method, device, config.compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    return model, tokenizer


def qlora(checkpoint, config: TrainConfig = TrainConfig(), device: str = "cpu", *, heldout: bool = True):
    """Load ``checkpoint`` as ``config.base_method``, add LoRA, train -> (peft model, tokenizer, result)."""
    base, tokenizer = load_base(checkpoint, config, device)
    peft_model = add_lora(base, config)
    return peft_model, tokenizer, run(peft_model, tokenizer, config, device, heldout=heldout)


__all__ = ["ALL_LINEAR", "TrainConfig", "TrainResult", "add_lora", "batches", "load_base", "make_optimizer",
           "random_qlora_base",
           "mean_loss", "no_repack_forward", "packed_blocks", "qlora", "run", "split_data", "train_steps", "trainable_parameters"]


# ---------------------------------------------------------------- random 4-bit bases of shape fixtures


def random_qlora_base(shape_name: str, device: str, compute_dtype: str = "bfloat16", *, seed: int = 0,
                      std: float = 0.02):
    """A shape fixture (``scalellm.shapes``) as a QLoRA base with random weights, built in 4-bit directly.

    A 7B model never exists densely on ``device``: the model is created with its parameters on the
    meta device (accelerate's ``init_empty_weights``; buffers such as rotary tables are real), then
    every decoder linear is replaced by a bnb ``Linear4bit`` (NF4, double quant, block 64) quantized
    from random N(0, std) values drawn into one reused scratch buffer of the largest linear's size
    (so building leaves no allocator holes behind), and the remaining parameters (embeddings, norms,
    ``lm_head``) are allocated on ``device`` in ``compute_dtype``. The model is flagged
    ``is_loaded_in_4bit`` as transformers flags a quantized load, so peft prepares it the same way.
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from scalellm.shapes import load_shape

    dtype = getattr(torch, compute_dtype)
    config = load_shape(shape_name)
    with torch.device(device), init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    output = model.get_output_embeddings()
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear) and child is not output]
    scratch = torch.empty(max(c.in_features * c.out_features for _, _, c in linears), dtype=dtype, device=device)
    for parent, name, child in linears:
        w = scratch[: child.in_features * child.out_features].view(child.out_features, child.in_features)
        w.normal_(0.0, std, generator=gen)  # (out, in)
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        # Params4bit quantizes when moved to a real device (bnb.nn.Params4bit.to -> _quantize);
        # clone() gives it its own copy of the scratch slice, freed once quantized
        q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                     blocksize=64).to(device)
        if child.bias is not None:
            q.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device),
                                        requires_grad=False)
        setattr(parent, name, q)
    del scratch
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.device.type != "meta":
                continue
            data = torch.empty(p.shape, dtype=dtype, device=device)
            if p.dim() == 1:
                data.fill_(1.0 if name == "weight" else 0.0)  # norm scales 1, biases 0
            else:
                data.normal_(0.0, std, generator=gen)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=False))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    return model.eval()
