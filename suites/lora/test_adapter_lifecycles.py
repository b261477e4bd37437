"""Adapter management as users run it: combine, rescale, save one of several, attach to chosen layers,
merge -> unmerge -> merge again, and eval mode with dropout.

Every check has an oracle outside peft: the LoRA definition (Hu et al. 2021) computed here with torch
from the raw tensors peft holds (``lora_A``/``lora_B`` weights, the base weight and bias), and the
scaling the config asks for: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023),
times the multiplier set by the user; DoRA's ``m * V / ||V||`` (Liu et al. 2024) and IA³'s per-channel
product (Liu et al. 2022); DARE's keep-with-probability-p-and-rescale-by-1/p (Yu et al. 2023); and, for
what gets attached or saved, the set of module / tensor names written out here (read back from the
saved safetensors file, not from peft). Models are tiny, built from configs or torch modules with
random weights: no download.
"""

from __future__ import annotations

import math

import pytest

from scalellm import lora_math
from suites.helpers.packages import need

pytestmark = [pytest.mark.lora, pytest.mark.reference]

#: LoRA rank and alpha of every adapter here: alpha/r = 2, alpha/sqrt(r) = 4, so a scaling that
#: forgets rsLoRA is off by 2x.
RANK, ALPHA = 4, 8
#: fp32 output of a 16->24 linear plus its LoRA term, vs the same sums in another order: rounding
#: only (eps 1.2e-7, values of order 1, sums of 16 terms) -> 1e-5. A 2% scaling error moves the
#: output by ~1e-2.
ATOL = 1e-5
#: Weights after merge / unmerge: peft divides by (IA3 vector + 1e-8) or by DoRA's factor, and
#: subtracts what it added; fp32 rounding of a product of two O(1) numbers -> 1e-5 relative.
MERGE_RTOL, MERGE_ATOL = 1e-5, 1e-5


@pytest.fixture
def peft():
    return need("peft")


def _seeded(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch


def _two_linears():
    """A module with ``proj`` (16->24) and ``up_proj`` (16->24): ``proj`` is a suffix of ``up_proj``."""
    torch = _seeded()

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 24)
            self.up_proj = torch.nn.Linear(16, 24)

        def forward(self, x):
            return self.proj(x) + self.up_proj(x)

    return Two()


def _lora(peft, targets, **kw):
    kw.setdefault("r", RANK)
    kw.setdefault("lora_alpha", ALPHA)
    kw.setdefault("init_lora_weights", False)  # B random too, so the LoRA term is not zero
    return peft.LoraConfig(target_modules=list(targets), **kw)


def _raw(layer, adapter):
    """(A, B) of ``adapter`` in a peft LoRA layer, detached copies of the raw tensors."""
    return (layer.lora_A[adapter].weight.detach().clone(), layer.lora_B[adapter].weight.detach().clone())


def _lora_linear(base, x, A, B, scale):
    """LoRA's definition: ``W x + b + scale * B (A x)``."""
    return x @ base.weight.detach().T + base.bias.detach() + scale * (x @ A.T) @ B.T


def _scale(use_rslora: bool) -> float:
    return lora_math.scaling(ALPHA, RANK, use_rslora)


def _assert_close(got, want, what, rtol=0.0, atol=ATOL):
    import torch

    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, rtol=rtol, atol=atol), f"{what}: max |diff| {err:.3g} (atol {atol})"


def _lora_names(model, adapter="default"):
    return {n for n, m in model.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


def _assert_attached(model, want: set[str]):
    got = _lora_names(model)
    assert got == want, f"LoRA attached to {sorted(got - want)} beyond, {sorted(want - got)} missing"


# ---------------------------------------------------------------- scaling

SCALE_STEPS = {
    # step name: (what the user does to the layer, the multiplier it leaves)
    "as_created": (lambda layer: None, 1.0),
    "set_scale_0.5": (lambda layer: layer.set_scale("default", 0.5), 0.5),
    "scale_layer_3": (lambda layer: layer.scale_layer(3.0), 3.0),
    "scale_then_unscale": (lambda layer: (layer.scale_layer(3.0), layer.unscale_layer(None)), 1.0),
}


@pytest.mark.parametrize("step", list(SCALE_STEPS))
@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha_over_r", "rslora"])
def test_lora_output_is_base_plus_alpha_over_r_times_multiplier(peft, use_rslora, step, device):
    model = peft.get_peft_model(_two_linears(), _lora(peft, ["proj"], use_rslora=use_rslora)).to(device)
    layer = model.base_model.model.proj
    action, multiplier = SCALE_STEPS[step]
    action(layer)
    torch = _seeded(1)
    x = torch.randn(5, 16, device=device)
    A, B = _raw(layer, "default")
    with torch.no_grad():
        got = layer(x)
    want = _lora_linear(layer.get_base_layer(), x, A, B, multiplier * _scale(use_rslora))
    _assert_close(got, want, f"{step}, scale {'alpha/sqrt(r)' if use_rslora else 'alpha/r'} x {multiplier}")


def test_dropout_is_off_in_eval_mode(peft):
    model = peft.get_peft_model(_two_linears(), _lora(peft, ["proj"], lora_dropout=0.5))
    layer = model.base_model.model.proj
    torch = _seeded(1)
    x = torch.randn(64, 16)
    A, B = _raw(layer, "default")
    want = _lora_linear(layer.get_base_layer(), x, A, B, _scale(False))
    model.train()
    with torch.no_grad():
        trained = layer(x)
    assert not torch.allclose(trained, want, atol=ATOL), "dropout 0.5 changed nothing in train mode"
    model.eval()
    with torch.no_grad():
        _assert_close(layer(x), want, "eval mode, lora_dropout=0.5")


# ---------------------------------------------------------------- combining adapters

#: name: (combination_type, weights of adapters "one", "two"); the oracle is sum_i w_i * s_i * B_i A_i
#: (one adapter, or "cat", which concatenates the ranks: exact for any signs).
COMBINATIONS = {
    "linear_minus_one": ("linear", [-1.0]),
    "linear_half": ("linear", [0.5]),
    "linear_minus_0.3": ("linear", [-0.3]),
    "cat_plus_minus": ("cat", [0.7, -0.4]),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_weighted_adapter_equals_weighted_sum_of_deltas(peft, name, device):
    combination, weights = COMBINATIONS[name]
    adapters = ["one", "two"][: len(weights)]
    model = peft.get_peft_model(_two_linears(), _lora(peft, ["proj"]), adapter_name="one")
    _seeded(7)
    model.add_adapter("two", _lora(peft, ["proj"]))
    model.to(device)
    layer = model.base_model.model.proj
    raws = {a: _raw(layer, a) for a in adapters}
    model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination)
    model.set_adapter("mix")
    torch = _seeded(1)
    x = torch.randn(5, 16, device=device)
    delta = sum(w * _scale(False) * raws[a][1] @ raws[a][0] for a, w in zip(adapters, weights))
    base = layer.get_base_layer()
    want = x @ (base.weight.detach() + delta).T + base.bias.detach()
    with torch.no_grad():
        _assert_close(layer(x), want, f"{combination} of {dict(zip(adapters, weights))}")


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_dare_keeps_with_probability_density_and_rescales(peft, density):
    """DARE (Yu et al. 2023): each entry is dropped with probability 1-p and the kept ones are divided
    by p, so every output is 0 or t/p and the expectation is t."""
    from peft.utils.merge_utils import dare_linear

    torch = _seeded(3)
    n = 200_000
    t = torch.ones(n)
    out = dare_linear([t], torch.tensor([1.0]), density)
    values = set(out.unique().tolist())
    assert values <= {0.0, 1.0 / density}, f"values {sorted(values)[:5]}: kept entries not rescaled by 1/{density}"
    # mean of n Bernoulli(p)/p: std sqrt((1-p)/(p n)) <= 0.004 here; 6 sigma -> no false alarm.
    sigma = math.sqrt((1 - density) / (density * n))
    assert abs(out.mean().item() - 1.0) < 6 * sigma, f"mean {out.mean().item():.4f}, want 1 +- {6 * sigma:.4f}"


# ---------------------------------------------------------------- saving one of several adapters

@pytest.mark.parametrize("adapter", ["foo", "foobar"])
def test_saving_an_adapter_writes_exactly_its_tensors(peft, adapter, tmp_path):
    from safetensors.torch import load_file

    model = peft.get_peft_model(_two_linears(), _lora(peft, ["proj", "up_proj"]), adapter_name="foo")
    _seeded(7)
    model.add_adapter("foobar", _lora(peft, ["proj", "up_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=[adapter])
    saved = load_file(tmp_path / adapter / "adapter_model.safetensors")
    want = {f"base_model.model.{m}.lora_{ab}.weight" for m in ("proj", "up_proj") for ab in "AB"}
    assert set(saved) == want, f"saved {sorted(set(saved) - want)} beyond, {sorted(want - set(saved))} missing"
    for m in ("proj", "up_proj"):
        A, B = _raw(getattr(model.base_model.model, m), adapter)
        _assert_close(saved[f"base_model.model.{m}.lora_A.weight"], A, f"{m}.lora_A of {adapter}", atol=0)
        _assert_close(saved[f"base_model.model.{m}.lora_B.weight"], B, f"{m}.lora_B of {adapter}", atol=0)


@pytest.mark.parametrize("module", ["proj", "weight_proj", "lin_weight", "default_proj"])
def test_saved_adapter_reloads_its_tensors_whatever_the_module_name(peft, module, tmp_path):
    """Save -> reload onto a fresh copy of the base: the reloaded A and B are the saved ones (module
    names that contain ``weight`` or the adapter's name included)."""
    import copy

    torch = _seeded()
    base = torch.nn.Sequential()
    base.add_module(module, torch.nn.Linear(16, 24))
    fresh = copy.deepcopy(base)
    model = peft.get_peft_model(base, _lora(peft, [module]))
    A, B = _raw(getattr(model.base_model.model, module), "default")
    model.save_pretrained(tmp_path)
    _seeded(99)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    layer = getattr(reloaded.base_model.model, module)
    rA, rB = _raw(layer, "default")
    _assert_close(rA, A, f"{module}.lora_A after reload", atol=0)
    _assert_close(rB, B, f"{module}.lora_B after reload", atol=0)


# ---------------------------------------------------------------- attaching to the asked modules

def _tiny_llama():
    need("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded()
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("layers", [0, [0], 2, [1, 2]], ids=["int0", "list0", "int2", "list1_2"])
def test_layers_to_transform_attaches_to_exactly_those_layers(peft, layers):
    cfg = _lora(peft, ["q_proj", "v_proj"], layers_to_transform=layers, layers_pattern="layers")
    model = peft.get_peft_model(_tiny_llama(), cfg)
    asked = [layers] if isinstance(layers, int) else layers
    want = {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in asked for p in ("q_proj", "v_proj")}
    _assert_attached(model, want)


def _experts(n_layers=3, n_experts=3):
    """``model.layers.<i>.experts.<j>.up_proj``: every module name holds two indices."""
    torch = _seeded()
    nn = torch.nn

    def expert():
        return nn.ModuleDict({"up_proj": nn.Linear(8, 8)})

    layers = nn.ModuleList(nn.ModuleDict({"experts": nn.ModuleList(expert() for _ in range(n_experts))})
                           for _ in range(n_layers))
    return nn.ModuleDict({"model": nn.ModuleDict({"layers": layers})})


@pytest.mark.parametrize("pattern", [None, "layers"], ids=["no_pattern", "pattern_layers"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_layer_index_is_the_layer_not_a_later_number_in_the_name(peft, layer, pattern):
    cfg = _lora(peft, ["up_proj"], layers_to_transform=[layer], layers_pattern=pattern)
    model = peft.get_peft_model(_experts(), cfg)
    want = {f"base_model.model.model.layers.{layer}.experts.{j}.up_proj" for j in range(3)}
    _assert_attached(model, want)


def _suffix_names():
    """``model.layers.<i>`` (i < 12) and ``sub_model.layers.<i>`` (i < 2), each with ``proj``, ``up_proj``,
    ``gate_up_proj``: names that are string suffixes of other names (``proj`` / ``up_proj`` /
    ``gate_up_proj``; ``layers.1`` / ``layers.11``; ``model.layers.1.proj`` / ``sub_model.layers.1.proj``)."""
    torch = _seeded()
    nn = torch.nn

    def stack(n):
        blocks = (nn.ModuleDict({k: nn.Linear(4, 4) for k in ("proj", "up_proj", "gate_up_proj")}) for _ in range(n))
        return nn.ModuleDict({"layers": nn.ModuleList(blocks)})

    return nn.ModuleDict({"model": stack(12), "sub_model": stack(2)})


#: targets -> the modules they name, written out. peft's rule: a target is the module's whole name or
#: its suffix at a ``.`` boundary.
SUFFIX_TARGETS = {
    "short_up_proj": (["up_proj"], [f"model.layers.{i}.up_proj" for i in range(12)]
                      + [f"sub_model.layers.{i}.up_proj" for i in range(2)]),
    "full_path_1_up_proj": (["model.layers.1.up_proj"], ["model.layers.1.up_proj"]),
    "full_paths_1_proj_11_gate": (["model.layers.1.proj", "model.layers.11.gate_up_proj"],
                                  ["model.layers.1.proj", "model.layers.11.gate_up_proj"]),
    "partial_path_layers_1_proj": (["layers.1.proj"], ["model.layers.1.proj", "sub_model.layers.1.proj"]),
}


@pytest.mark.parametrize("case", list(SUFFIX_TARGETS))
def test_targets_that_are_suffixes_of_other_names_attach_only_where_asked(peft, case):
    targets, names = SUFFIX_TARGETS[case]
    model = peft.get_peft_model(_suffix_names(), _lora(peft, targets))
    _assert_attached(model, {f"base_model.model.{n}" for n in names})


# ---------------------------------------------------------------- merge -> unmerge -> merge


def _merge_case(peft, kind):
    """(peft model, the adapted layer, weight read as (out, in, ...), merged-weight oracle, bias oracle)."""
    torch = _seeded()
    nn = torch.nn
    if kind == "lora_linear":
        model = peft.get_peft_model(nn.Sequential(nn.Linear(16, 24)), _lora(peft, ["0"]))
        layer = model.base_model.model[0]

        def merged(w, b):
            A, B = _raw(layer, "default")
            return w + _scale(False) * B @ A, b

        return model, layer, (lambda w: w), merged
    if kind == "ia3_conv2d":
        cfg = peft.IA3Config(target_modules=["0"], feedforward_modules=[], init_ia3_weights=False)
        model = peft.get_peft_model(nn.Sequential(nn.Conv2d(3, 4, 3)), cfg)
        layer = model.base_model.model[0]

        def merged(w, b):  # IA3 on a non-feedforward layer scales each output channel
            vec = layer.ia3_l["default"].detach().reshape(-1)
            return w * vec.view(-1, 1, 1, 1), b * vec

        return model, layer, (lambda w: w), merged
    # DoRA on transformers' Conv1D (weight stored (in, out): fan_in_fan_out)
    need("transformers")
    from transformers.pytorch_utils import Conv1D

    nf = 24 if kind == "dora_conv1d_16x24" else 16
    cfg = _lora(peft, ["0"], use_dora=True, fan_in_fan_out=True)
    model = peft.get_peft_model(nn.Sequential(Conv1D(nf, 16)), cfg)
    layer = model.base_model.model[0]

    def merged(w, b):  # w: (out, in); DoRA: m * V / ||V|| per output row, V = W + s B A
        A, B = _raw(layer, "default")
        v = w + _scale(False) * B @ A
        m = layer.lora_magnitude_vector["default"].weight.detach()
        return (m / v.norm(dim=1)).view(-1, 1) * v, b

    return model, layer, (lambda w: w.T), merged


MERGE_KINDS = ["lora_linear", "ia3_conv2d", "dora_conv1d_16x24", "dora_conv1d_16x16"]


@pytest.mark.parametrize("kind", MERGE_KINDS)
def test_merge_unmerge_merge_restores_and_reapplies_the_formula(peft, kind, device):
    model, layer, as_out_in, merged = _merge_case(peft, kind)
    model.to(device)
    base = layer.get_base_layer()
    w0, b0 = as_out_in(base.weight.detach()).clone(), base.bias.detach().clone()
    want_w, want_b = merged(w0, b0)
    tol = {"rtol": MERGE_RTOL, "atol": MERGE_ATOL}
    for step in ("merge", "unmerge", "merge again"):
        (model.unmerge_adapter if step == "unmerge" else model.merge_adapter)()
        w, b = as_out_in(base.weight.detach()), base.bias.detach()
        expect_w, expect_b = (w0, b0) if step == "unmerge" else (want_w, want_b)
        _assert_close(w, expect_w, f"{kind} weight after {step}", **tol)
        _assert_close(b, expect_b, f"{kind} bias after {step}", **tol)
