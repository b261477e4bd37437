"""The memory planner's arithmetic: exact counts, hand-checked figures, every fixture x method."""

from __future__ import annotations

import pytest

from scalellm import planner, shapes
from scalellm.baselines import Tolerance

pytestmark = [pytest.mark.memory, pytest.mark.reference]

GIB = planner.GIB
FIXTURES = shapes.list_shapes()
METHODS = ("fp32", "bf16", "fp16", "int8", "nf4", "nf4-dq", "fp4", "gptq4", "gguf:Q4_K", "gguf:Q8_0")
#: A prediction is deterministic arithmetic: any change means the planner's constants moved.
PREDICTION = Tolerance(rel=1e-6, why="deterministic arithmetic; a change means the planner's model changed")
#: peft prints "trainable params: 39,976,960" for Llama-2-7B with r=16 on all linears (LoRA §4.1: r x (in+out)).
LLAMA2_7B_LORA_R16 = 39_976_960


@pytest.mark.parametrize("name", FIXTURES)
def test_parameter_count_is_the_published_one(name):
    assert planner.model_shape(name).parameters == shapes.shape_info(name)["parameters"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_and_method_gets_an_inference_plan(name, method, record_metric):
    p = planner.plan(name, planner.Setting(method, "inference", seq=2048))
    assert p.peak == sum(p.parts.values())
    assert set(p.fits) == {f"{g} GiB" for g in planner.CARDS_GIB}
    assert all(ok == (p.peak <= int(label.split()[0]) * GIB) for label, ok in p.fits.items())
    record_metric("peak_GiB", p.peak_gib, unit="GiB", better="equal", tolerance=PREDICTION)


@pytest.mark.parametrize("method,task", [("nf4", "qlora"), ("int8", "qlora"), ("bf16", "lora"), ("bf16", "full"),
                                         ("fp32", "full")])
@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_gets_a_training_plan(name, method, task, record_metric):
    p = planner.plan(name, planner.Setting(method, task, seq=1024, batch=2, grad_checkpointing=True))
    assert p.trainable > 0 and p.parts["gradients"] > 0 and p.parts["optimizer states"] > 0
    assert p.parts["KV cache"] == 0
    record_metric("peak_GiB", p.peak_gib, unit="GiB", better="equal", tolerance=PREDICTION)


def test_weights_shrink_with_the_bits():
    weights = [planner.plan("llama-2-7b", planner.Setting(m)).parts["weights"] for m in ("fp32", "bf16", "int8", "nf4")]
    assert weights == sorted(weights, reverse=True)


def test_llama2_7b_bf16_weights_are_two_bytes_per_parameter():
    assert planner.plan("llama-2-7b", planner.Setting("bf16")).parts["weights"] == 6_738_415_616 * 2


def test_llama2_7b_nf4_weights_and_block_constants():
    shape = planner.model_shape("llama-2-7b")
    p = planner.plan("llama-2-7b", planner.Setting("nf4"))
    # 4 bits per linear weight, bf16 for embeddings, lm_head and norms
    assert p.parts["weights"] == 6_476_005_376 // 2 + (6_738_415_616 - 6_476_005_376) * 2
    # one float32 absmax per 64 weights (QLoRA §3: 32/64 = 0.5 bits per parameter); no tail blocks here
    assert p.parts["quantization constants"] == shape.linear_parameters // 64 * 4


def test_double_quant_cuts_the_constants_to_about_an_eighth_of_a_bit():
    single = planner.plan("llama-2-7b", planner.Setting("nf4")).parts["quantization constants"]
    double = planner.plan("llama-2-7b", planner.Setting("nf4-dq")).parts["quantization constants"]
    # QLoRA §3: 0.5 -> 8/64 + 32/(64*256) = 0.127 bits per parameter
    assert double / single == pytest.approx(0.126953125 / 0.5, rel=1e-3)


def test_llama2_7b_kv_cache_at_4096_tokens_is_two_gib_in_bf16():
    # 2 (K and V) x 32 layers x 32 heads x 128 dims x 4096 tokens x 2 bytes
    assert planner.plan("llama-2-7b", planner.Setting("bf16", seq=4096)).parts["KV cache"] == 2 * GIB


def test_grouped_query_attention_shrinks_the_kv_cache():
    llama = planner.plan("llama-2-7b", planner.Setting("bf16", seq=4096)).parts["KV cache"]
    mistral = planner.plan("mistral-7b", planner.Setting("bf16", seq=4096)).parts["KV cache"]
    assert mistral * 4 == llama  # 8 KV heads instead of 32


def test_lora_parameter_count_matches_peft_for_llama2_7b():
    p = planner.plan("llama-2-7b", planner.Setting("nf4", "qlora", rank=16))
    assert p.trainable == LLAMA2_7B_LORA_R16
    assert p.parts["LoRA parameters"] == LLAMA2_7B_LORA_R16 * planner.LORA_BYTES


def test_adamw_keeps_two_states_and_paged_8bit_about_two_bytes():
    adamw = planner.plan("llama-2-7b", planner.Setting("nf4", "qlora", optimizer="adamw"))
    paged = planner.plan("llama-2-7b", planner.Setting("nf4", "qlora", optimizer="paged_adamw_8bit"))
    assert adamw.parts["optimizer states"] == 2 * LLAMA2_7B_LORA_R16 * 4
    assert paged.parts["optimizer states"] < adamw.parts["optimizer states"] / 3
    assert paged.torch_allocated < adamw.torch_allocated  # paged states are outside torch's allocator


def test_gradient_checkpointing_lowers_the_training_peak():
    base = planner.Setting("nf4", "qlora", seq=1024, batch=4)
    plain = planner.plan("llama-2-7b", base)
    ckpt = planner.plan("llama-2-7b", planner.Setting(**{**base.__dict__, "grad_checkpointing": True}))
    assert ckpt.parts["activations"] < plain.parts["activations"] / 2


def test_accelerate_figure_is_the_base_model_in_float32_divided():
    p = planner.plan("llama-2-7b", planner.Setting("fp32"))
    shape = planner.model_shape("llama-2-7b")
    assert p.accelerate_estimate == shape.base_tensor_elements * 4
    assert planner.plan("llama-2-7b", planner.Setting("nf4")).accelerate_estimate == shape.base_tensor_elements // 2


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2-124m"])
def test_accelerate_figure_agrees_with_accelerates_own_sizing(name):
    """Our re-computation of ``accelerate estimate-memory``'s total equals accelerate's
    ``calculate_maximum_sizes`` on the ``AutoModel`` it builds (float32, meta)."""
    from suites.helpers.packages import need

    need("accelerate")
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModel

    with init_empty_weights():
        model = AutoModel.from_config(shapes.load_shape(name), dtype=torch.float32)
    total, _ = calculate_maximum_sizes(model)
    assert planner.plan(name, planner.Setting("fp32")).accelerate_estimate == total


def test_seed_rule_of_thumb_is_two_bytes_per_parameter_in_bf16():
    assert planner.plan("llama-2-7b", planner.Setting("bf16")).rule_of_thumb == pytest.approx(2 * 6.738415616)


@pytest.mark.parametrize("name", ["smollm2-135m", "gpt2-124m"])
def test_predicted_weights_equal_a_real_cpu_model(name):
    """On cpu, the weights footprint of a random bf16 model equals the planner's weights figure."""
    import torch

    model = shapes.random_model(name, dtype=torch.bfloat16, device="cpu")
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert planner.plan(name, planner.Setting("bf16")).parts["weights"] == held


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * GIB), ("7.5 GB", 7_500_000_000), ("12", 12 * GIB),
                                           ("512MiB", 512 << 20)])
def test_budget_sizes_are_parsed(text, expected):
    assert planner.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["8XB", "-3GiB", "0GiB", "", "eight"])
def test_nonsense_budgets_are_refused(text):
    with pytest.raises(planner.PlanError, match="budget"):
        planner.parse_budget(text)


@pytest.mark.parametrize("setting,match", [
    (planner.Setting("int3"), "unknown method"),
    (planner.Setting("gguf:Q9_9"), "unknown GGUF block type"),
    (planner.Setting("gguf:Q4_0", "qlora"), "inference"),
    (planner.Setting("nf4", "full"), "full fine-tuning needs dense"),
    (planner.Setting("bf16", "qlora"), "quantized base"),
    (planner.Setting("bf16", "pretrain"), "unknown task"),
    (planner.Setting("bf16", seq=0), "--seq"),
])
def test_impossible_settings_are_refused(setting, match):
    with pytest.raises(planner.PlanError, match=match):
        planner.plan("smollm2-135m", setting)


def test_a_config_without_the_needed_fields_names_them(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(planner.PlanError, match="num_hidden_layers"):
        planner.model_shape(str(path))


def test_a_checkpoint_directory_is_read_through_its_config(tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps(shapes.shape_dict("smollm2-135m")))
    assert planner.model_shape(str(tmp_path)).parameters == shapes.shape_info("smollm2-135m")["parameters"]
