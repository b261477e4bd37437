"""Lifecycles users run on bitsandbytes' quantized layers, each checked against the reference.

A model is not quantized once and used once: ``.to()`` is called again by every ``model.to(device)``,
``accelerate`` dispatch and trainer; a quantized model is saved and reloaded without quantizing it
again. Each of these has broken in a real bnb release (0.48.0: a pre-quantized int8 weight lost its
quantized data on ``.to()``, bitsandbytes#1775). Here:

- right after quantizing, the layer's stored state is the reference's quantization of the original
  weight: NF4 packed codes and absmax (:func:`scalellm.quant.quantize_4bit`), int8 codes and row
  statistics (:func:`scalellm.quant.int8.vectorwise_quantize`), bit for bit on cpu; on cuda the
  int8 codes as ``suites/conformance/test_int8.py`` holds bnb's kernel to (``assert_int8_codes_agree``:
  a few codes one step off, the kernel's approximate divide), the row statistics still bit for bit;
- after every later step the layer holds that same state, bit for bit, on every device;
- its forward is ``x Ŵᵀ + b`` with ``Ŵ`` the reference dequantization of that state (float64),
  within the float32 dot-product bound (``suites/conformance/test_layouts.py`` says which).

Steps: quantize by ``.to(device)``; ``.to(device)`` again; (cuda) ``.to("cpu")`` and back; and, for
a small random Llama through transformers, quantize at load, ``save_pretrained`` and
``from_pretrained`` of that pre-quantized checkpoint (no second quantization).
"""

from __future__ import annotations

import numpy as np
import pytest

from scalellm.quant import dequantize_4bit, quantize_4bit
from scalellm.quant.int8 import INV_127, vectorwise_quantize
from suites.helpers.bnb_codec import BnbResult
from suites.helpers import assertions as ah
from suites.helpers.packages import need

pytestmark = [pytest.mark.reference]

#: Rows of whole blocks (128 = 2 x 64): a row that straddles blocks meets bnb 0.50.2's AVX512 decode bug,
#: held by test_blockwise_4bit's strict xfail; a lifecycle test must see only what the lifecycle does.
IN_FEATURES, OUT_FEATURES, TOKENS, BLOCKSIZE = 128, 40, 6, 64
METHODS = [pytest.param("nf4", marks=pytest.mark.nf4), pytest.param("int8", marks=pytest.mark.int8)]
UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2


def original():
    """(weight (out, in), bias (out,), x (tokens, in)): seeded float32."""
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(OUT_FEATURES, IN_FEATURES, generator=g), torch.randn(OUT_FEATURES, generator=g),
            torch.randn(TOKENS, IN_FEATURES, generator=g))


def unquantized_layer(method: str, weight, bias):
    """bnb's layer holding ``weight`` not yet quantized (as transformers builds it); ``.to()`` quantizes."""
    import torch

    bnb = need("bitsandbytes")
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=True, has_fp16_weights=False, threshold=0.0)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(IN_FEATURES, OUT_FEATURES, bias=True, compute_dtype=torch.float32,
                                  compress_statistics=False, quant_type=method)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=method, blocksize=BLOCKSIZE,
                                         compress_statistics=False)
    layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer


def stored_state(method: str, layer) -> tuple[np.ndarray, np.ndarray]:
    """The layer's quantized state, copied to the host: (int8 codes, row statistics) or (4-bit
    packed codes, absmax)."""
    w = layer.weight
    if method == "int8":
        # the row statistics live on the weight until the first forward, then in the layer's state
        # (Linear8bitLt.init_8bit_state, bnb 0.50)
        scb = getattr(w, "SCB", None)
        scb = scb if scb is not None else getattr(layer.state, "SCB", None)
        assert scb is not None, "int8 weight: no row statistics (SCB): the quantized state is lost"
        return w.data.cpu().numpy().copy(), scb.cpu().numpy().copy()
    assert w.quant_state is not None, f"{method} weight: no quant_state: the quantized state is lost"
    return w.data.cpu().numpy().copy(), w.quant_state.absmax.cpu().numpy().copy()


def reference_weight(method: str, layer, weight, device: str, step: str) -> np.ndarray:
    """Check the layer's state right after quantizing against the reference quantization of
    ``weight``; return the reference dequantization of that state (out, in) float64."""
    codes, scales = stored_state(method, layer)
    if method == "int8":
        ref = vectorwise_quantize(weight.half())  # Int8Params quantizes the float16 weight (bnb 0.50 _quantize)
        ah.assert_layout(f"int8 weight after {step}", codes, shape=tuple(weight.shape), dtype="int8")
        ah.assert_int8_codes_agree(f"int8 codes after {step}", device, ref.codes, codes)
        ah.assert_floats_identical(f"int8 row statistics after {step}", scales, ref.row_stats)
        return (codes.astype(np.float64) * scales[:, None]) * float(INV_127)
    state = layer.weight.quant_state
    ref = quantize_4bit(weight, method, state.blocksize)
    got = BnbResult(codes.reshape(-1), scales, state, weight.numel(), layer.weight.data)
    ah.assert_codes_equal(f"{method} codes after {step}", got.codes(), ref.codes(), state.blocksize)
    ah.assert_floats_identical(f"{method} absmax after {step}", got.absmax, ref.absmax)
    return dequantize_4bit(got.as_reference_state("float32")).reshape(weight.shape).astype(np.float64)


def assert_state_kept(method: str, layer, first: tuple[np.ndarray, np.ndarray], step: str) -> None:
    """The layer holds ``first`` (its state right after quantizing), bit for bit."""
    codes, scales = stored_state(method, layer)
    what = ("codes", "row statistics") if method == "int8" else ("packed codes", "absmax")
    ah.assert_floats_identical(f"{method} {what[0]} after {step}", codes, first[0])
    ah.assert_floats_identical(f"{method} {what[1]} after {step}", scales, first[1])


def check_forward(method: str, layer, first, w_hat: np.ndarray, bias, x, device: str, step: str) -> None:
    """The layer still holds ``first``, and its forward is ``x Ŵᵀ + b`` within the float32 bound."""
    import torch

    assert_state_kept(method, layer, first, step)
    layer = layer.train()  # no CPU repacking on the first inference forward (test_layouts says why)
    with torch.no_grad():
        y = layer(x.to(device))
    op = f"{method} forward after {step}"
    ah.assert_layout(op, y, shape=(TOKENS, OUT_FEATURES), dtype="float32", device=device)
    xs = x.double().numpy()
    expected = xs @ w_hat.T + bias.double().numpy()
    # int8 forward: x is quantized too (LLM.int8), so its own rounding adds up to half a step of each row
    x_step = np.abs(xs).max(axis=1, keepdims=True) / 254.0 if method == "int8" else 0.0
    bound = (IN_FEATURES * 2 * UNIT_ROUNDOFF * (np.abs(xs) @ np.abs(w_hat).T) + np.abs(expected) * 2e-7
             + x_step * np.abs(w_hat).sum(axis=1)[None, :])
    ah.assert_within(op, y.float().cpu().numpy(), expected, bound)


def quantized_layer(method: str, weight, bias, device: str):
    """(bnb's layer quantized by ``.to(device)``, its state then, the reference dequantization of it)."""
    layer = unquantized_layer(method, weight, bias).to(device)
    w_hat = reference_weight(method, layer, weight, device, f"the first .to({device!r})")
    return layer, stored_state(method, layer), w_hat


@pytest.mark.parametrize("method", METHODS)
def test_moving_a_quantized_layer_to_its_device_again_keeps_its_state(device, method):
    weight, bias, x = original()
    layer, first, w_hat = quantized_layer(method, weight, bias, device)
    check_forward(method, layer, first, w_hat, bias, x, device, f"the first .to({device!r})")
    layer = layer.to(device)
    check_forward(method, layer, first, w_hat, bias, x, device, f"a second .to({device!r})")
    layer = layer.to(device).to(device)
    check_forward(method, layer, first, w_hat, bias, x, device, f"a third and fourth .to({device!r})")


@pytest.mark.devices("cuda")
@pytest.mark.parametrize("method", METHODS)
def test_a_quantized_layer_moved_to_cpu_and_back_keeps_its_state(device, method):
    weight, bias, x = original()
    layer, first, w_hat = quantized_layer(method, weight, bias, device)
    layer = layer.to("cpu").to(device)
    check_forward(method, layer, first, w_hat, bias, x, device, f".to('cpu') and .to({device!r})")


@pytest.mark.int8
def test_prequantized_int8_codes_move_while_their_row_statistics_are_still_on_meta(device):
    """accelerate's loader (``init_empty_weights``, offload) fills an int8 layer one tensor at a time:
    the codes arrive and are moved with ``.to()`` while the row statistics (SCB) are still a meta
    placeholder, replaced only later. The move must leave the placeholder alone (bnb 0.48.1 copied it
    and raised 'Cannot copy out of meta tensor', bitsandbytes#1786); once SCB arrives the layer holds
    the reference's state and computes ``x Ŵᵀ + b``."""
    import torch

    bnb = need("bitsandbytes")
    weight, bias, x = original()
    ref = vectorwise_quantize(weight.half())  # what a pre-quantized checkpoint stores
    codes = bnb.nn.Int8Params(torch.from_numpy(ref.codes), requires_grad=False, has_fp16_weights=False)
    codes.SCB = torch.empty(OUT_FEATURES, device="meta")
    moved = codes.to(device)
    moved.SCB = torch.from_numpy(ref.row_stats).to(device)  # the loader's next tensor
    layer = bnb.nn.Linear8bitLt(IN_FEATURES, OUT_FEATURES, bias=True, has_fp16_weights=False, threshold=0.0)
    layer.weight = moved
    layer.bias = torch.nn.Parameter(bias.to(device), requires_grad=False)
    w_hat = (ref.codes.astype(np.float64) * ref.row_stats[:, None]) * float(INV_127)
    check_forward("int8", layer, (ref.codes, ref.row_stats), w_hat, bias, x, device,
                  f"codes moved .to({device!r}) before their row statistics")


TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def quantization_config(method: str):
    import torch
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_compute_dtype=torch.float32,
                              bnb_4bit_use_double_quant=False)


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_quantized_model_reloads_without_quantizing_again(device, method, tmp_path):
    """transformers' path: quantize at load, ``save_pretrained``, ``from_pretrained`` of the saved
    (pre-quantized) checkpoint. The state quantized at load is the reference's quantization of the
    original weight; the reloaded layer holds that state, and the logits are those before the save."""
    import torch

    need("bitsandbytes")
    transformers = need("transformers")
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    dense.save_pretrained(tmp_path / "dense")
    weight = dense.model.layers[0].mlp.down_proj.weight.detach().clone()  # (64, 128)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=quantization_config(method), device_map=device).train()
    layer = quantized.model.layers[0].mlp.down_proj
    reference_weight(method, layer, weight, device, "quantizing at load")
    first = stored_state(method, layer)  # before the forward and the save
    ids = torch.randint(TINY_LLAMA["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        before = quantized(ids).logits
    quantized.save_pretrained(tmp_path / "quantized")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "quantized", device_map=device).train()
    step = "save_pretrained and from_pretrained of the quantized checkpoint"
    assert_state_kept(method, reloaded.model.layers[0].mlp.down_proj, first, step)
    with torch.no_grad():
        after = reloaded(ids).logits
    assert torch.equal(after, before), (f"{method} logits after {step} differ from before the save: "
                                        f"max |delta| {(after - before).abs().max().item():.3g}")


# ---------------------------------------------------------------- a quantization state written out and read back


def blockwise_state(kind: str, device: str):
    """(the values quantized, bnb's packed/codes tensor, its QuantState) for each kind of state bnb makes."""
    import torch

    bnb = need("bitsandbytes")
    x = torch.randn(8, 96, generator=torch.Generator().manual_seed(3)).to(device)
    if kind == "8bit-blockwise":
        codes, state = bnb.functional.quantize_blockwise(x, blocksize=BLOCKSIZE)
    else:
        codes, state = bnb.functional.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type="nf4",
                                                    compress_statistics=kind == "nf4-dq")
    return x, codes, state


STATE_KINDS = [pytest.param("8bit-blockwise", marks=pytest.mark.int8), pytest.param("nf4", marks=pytest.mark.nf4),
               pytest.param("nf4-dq", marks=pytest.mark.nf4)]


@pytest.mark.parametrize("kind", STATE_KINDS)
def test_a_quantization_state_survives_as_dict_and_from_dict(device, kind):
    """``QuantState.as_dict()`` -> ``QuantState.from_dict()`` (what every checkpoint writer and reader
    does) restores a state that dequantizes to the same values, for every kind of state."""
    import torch

    bnb = need("bitsandbytes")
    F = bnb.functional
    x, codes, state = blockwise_state(kind, device)
    restored = F.QuantState.from_dict(state.as_dict(), device=torch.device(device))
    op = f"{kind} QuantState.as_dict -> from_dict"
    if kind == "8bit-blockwise":
        before, after = F.dequantize_blockwise(codes, state), F.dequantize_blockwise(codes, restored)
    else:
        before, after = F.dequantize_4bit(codes, state), F.dequantize_4bit(codes, restored)
    ah.assert_layout(op, after, shape=tuple(before.shape), dtype=before.dtype, device=device)
    ah.assert_floats_identical(op + ": dequantized values", after.float().cpu().numpy(), before.float().cpu().numpy())


# ---------------------------------------------------------------- an op's out= buffer


@pytest.mark.nf4
def test_matmul_4bit_writes_its_result_into_out(device):
    """``bnb.matmul_4bit(x, W.t(), state, out=buffer)`` leaves ``x Ŵᵀ`` in ``buffer`` (the torch
    convention for ``out=``), ``Ŵ`` the reference dequantization of bnb's own state (its codes are
    checked against the reference elsewhere: test_layouts, test_lifecycles' layers)."""
    import torch

    bnb = need("bitsandbytes")
    weight, _, x = original()
    packed, state = bnb.functional.quantize_4bit(weight.to(device), blocksize=BLOCKSIZE, quant_type="nf4",
                                                 compress_statistics=False)
    out = torch.full((TOKENS, OUT_FEATURES), float("nan"), device=device)
    bnb.matmul_4bit(x.to(device), packed.t(), quant_state=state, out=out)
    own = BnbResult(packed.cpu().numpy().reshape(-1), state.absmax.cpu().numpy(), state, weight.numel(), packed)
    w_hat = dequantize_4bit(own.as_reference_state("float32")).reshape(OUT_FEATURES, IN_FEATURES).astype(np.float64)
    xs = x.double().numpy()
    expected = xs @ w_hat.T
    bound = IN_FEATURES * 2 * UNIT_ROUNDOFF * (np.abs(xs) @ np.abs(w_hat).T) + np.abs(expected) * 2e-7
    ah.assert_within("matmul_4bit(out=buffer): the buffer", out.cpu().numpy(), expected, bound)
