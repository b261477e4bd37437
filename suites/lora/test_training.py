"""Loss falls: a few QLoRA steps on the real model reduce training and held-out loss (QLoRA §4).

One run per device (``trained`` fixture, config in conftest.py). Seeds fix adapter init and batch
order, so a rerun on the same device repeats the losses.
"""

from __future__ import annotations

import statistics

import pytest

from scalellm import train
from scalellm.baselines import Tolerance
from suites.helpers.packages import need
from suites.helpers.bnb_paths import repacks_4bit_on_cpu
from suites.helpers.lora_runs import config_for

pytestmark = [pytest.mark.lora, pytest.mark.nf4, pytest.mark.quality]

#: Steps averaged at each end of the loss curve: batches differ in difficulty (measured on cpu, 10
#: steps of 2x64: per-step losses spread over ~1.5 nats), so single steps are too noisy to compare.
WINDOW = 3
#: Required training-loss drop, mean(first WINDOW) - mean(last WINDOW), in nats. Measured 1.48
#: (3.77 -> 2.29; N=1, cpu-x86_64, 10 steps r=8 lr 1e-3); about half of it is the stated margin.
#: (With the bnb CPU repack bug active — see test_inference_forward_... — the drop was only 0.69.)
MIN_TRAIN_DROP = 0.7
#: Required held-out loss drop in nats (16 unseen instruction examples). Measured 1.00 (4.58 -> 3.58;
#: N=1, cpu); half is the margin. (0.35 with the repack bug active.)
MIN_HELDOUT_DROP = 0.5
#: A rerun with the same seeds on the same device: fp32 CPU kernels are deterministic at a fixed
#: thread count; 1e-4 nats allows a changed thread count's reduction order.
REPEAT_ATOL = 1e-4
#: Loss figures vs baseline: deterministic per device; 0.05 nats covers a kernel or thread-count change.
LOSS_TOL = Tolerance(abs=0.05, why="fixed seeds; 0.05 nats covers reduction-order changes across kernels")


def _ends(losses):
    return statistics.fmean(losses[:WINDOW]), statistics.fmean(losses[-WINDOW:])


def test_training_loss_falls(trained, device, record_metric):
    _, _, result = trained
    first, last = _ends(result.losses)
    record_metric("train_loss_first", first, unit="nats", better="lower", tolerance=LOSS_TOL)
    record_metric("train_loss_last", last, unit="nats", better="lower", tolerance=LOSS_TOL)
    assert first - last >= MIN_TRAIN_DROP, f"training loss {first:.3f} -> {last:.3f}, losses {result.losses}"


def test_heldout_loss_falls(trained, device, record_metric):
    _, _, result = trained
    record_metric("heldout_loss_before", result.heldout_before, unit="nats", better="lower", tolerance=LOSS_TOL)
    record_metric("heldout_loss_after", result.heldout_after, unit="nats", better="lower", tolerance=LOSS_TOL)
    drop = result.heldout_before - result.heldout_after
    assert drop >= MIN_HELDOUT_DROP, f"held-out loss {result.heldout_before:.3f} -> {result.heldout_after:.3f}"


def test_training_repeats_with_fixed_seeds(trained, checkpoint, device):
    """Two runs with one config on one device: the first steps' losses agree."""
    _, _, first = trained
    again = train.TrainConfig(**{**first.config, "steps": 2})
    _, _, second = train.qlora(checkpoint, again, device, heldout=False)
    assert second.losses == pytest.approx(first.losses[:2], abs=REPEAT_ATOL)


def test_paged_optimizer_runs_where_it_exists(trained, device):
    """bnb's PagedAdamW8bit on CUDA (QLoRA §3); elsewhere the fallback is visible in the result."""
    _, _, result = trained
    if config_for(device).optimizer == "paged_adamw_8bit" and device == "cuda":
        assert result.optimizer == "paged_adamw_8bit"
    elif config_for(device).optimizer == "paged_adamw_8bit":
        assert result.optimizer == "adamw" and result.notes, "fallback must be reported"
    else:
        pytest.skip(f"{device} runs torch AdamW by config ({config_for(device).optimizer})")


#: Cosine similarity of an adapter's gradient before and after an inference forward. Same weights,
#: same batch: only kernel rounding may differ (bf16 kernel: eps 7.8e-3 per element) -> 0.99.
MIN_GRAD_COSINE = 0.99
_REPACK_REASON = ("bnb 0.50.2: after an eval-mode no-grad forward on an AVX512-BF16 CPU, Linear4bit runs "
                  "gemv_4bit, which has no autograd kernel: backward through the 4-bit base is dropped")


def test_inference_forward_leaves_training_gradients_unchanged(checkpoint, device, request):
    """Regression for a bnb CPU bug found here: one ``model.eval()`` + ``no_grad`` forward (any
    evaluation) silently breaks the gradients of later QLoRA steps on AVX512-BF16 CPUs. ``train``
    avoids it (``train.no_repack_forward``); this test watches the library behaviour itself."""
    import torch

    if device == "cpu" and repacks_4bit_on_cpu():
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=_REPACK_REASON))
    cfg = config_for(device)
    base, tokenizer = train.load_base(checkpoint, cfg, device)
    model = train.add_lora(base, cfg)
    x = train.split_data(tokenizer, cfg)[0][:1].to(device)  # (1, seq)
    probe = next(p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n)

    def grad():
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        g = probe.grad.detach().float().flatten().clone()
        model.zero_grad(set_to_none=True)
        return g

    before = grad()
    model.eval()
    with torch.no_grad():
        model(input_ids=x)  # an ordinary evaluation forward
    after = grad()
    cos = torch.nn.functional.cosine_similarity(before, after, dim=0).item()
    assert cos >= MIN_GRAD_COSINE, f"layer-0 adapter gradient changed by an inference forward: cosine {cos:.4f}"


#: trl SFTTrainer: 2 steps are enough to prove the path runs; loss must be finite and logged.
TRL_STEPS = 2


def test_trl_sft_trainer_runs(checkpoint, device, tmp_path):
    """trl's SFTTrainer on the QLoRA base. trl needs ``datasets`` (pyarrow, pandas): it
    is not part of the pinned stack, so this skips with the install hint unless it is installed."""
    need("trl")
    datasets = need("datasets")
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from scalellm.text import instruction_set

    cfg = config_for(device)
    base, tokenizer = train.load_base(checkpoint, cfg, device)
    examples, _ = instruction_set(8)
    data = datasets.Dataset.from_list([{"text": f"{e['prompt']}\n{e['response']}"} for e in examples])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=TRL_STEPS, per_device_train_batch_size=cfg.batch_size,
                     max_length=cfg.seq_len, learning_rate=cfg.lr, logging_steps=1, report_to=[],
                     save_strategy="no", gradient_checkpointing=cfg.gradient_checkpointing,
                     bf16=cfg.compute_dtype == "bfloat16", use_cpu=device == "cpu", seed=cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert out.global_step == TRL_STEPS and len(losses) == TRL_STEPS
    assert all(0 < x < 20 for x in losses), losses
