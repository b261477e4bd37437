"""The QLoRA runs the LoRA suites share: the training configuration of each device and the
"overfit one batch" check (the fixtures that run them live in suites/lora/conftest.py)."""

from __future__ import annotations

from scalellm import train

#: CPU run: tiny batches so the whole suite fits CI's 2-core budget (docs/evidence.md: QLoRA step on CPU:
#: 3.6 s per 4x128 step; 2x64 is a quarter of that). fp32 compute: bf16 matmuls on CPU are emulated and
#: slower.
CPU_CONFIG = train.TrainConfig(rank=8, steps=10, batch_size=2, seq_len=64, lr=1e-3, compute_dtype="float32",
                               optimizer="adamw")
#: CUDA/MPS run: the QLoRA recipe as published (bf16 compute; paged 8-bit AdamW where it exists).
GPU_CONFIG = train.TrainConfig(rank=8, steps=10, batch_size=2, seq_len=64, lr=1e-3, compute_dtype="bfloat16",
                               optimizer="paged_adamw_8bit")


def config_for(device: str) -> train.TrainConfig:
    return CPU_CONFIG if device == "cpu" else GPU_CONFIG


#: "Overfit one batch" checks: one held-out block of 32 tokens, repeated; lr 1e-3 as the runs above.
OVERFIT_CONFIG = train.TrainConfig(steps=4, batch_size=1, seq_len=32)


def overfit_losses(peft_model, tokenizer, device: str, config: train.TrainConfig = OVERFIT_CONFIG) -> list[float]:
    """Losses of ``config.steps`` steps on one fixed batch: the cheapest proof that gradients reach
    the adapters through a base (the loss of a repeated batch must fall)."""
    import itertools

    batch = train.split_data(tokenizer, config)[1][:1]  # (1, seq_len)
    optimizer, _ = train.make_optimizer([p for p in peft_model.parameters() if p.requires_grad], config, device)
    losses, _ = train.train_steps(peft_model, optimizer, itertools.repeat(batch, config.steps), device)
    return losses
