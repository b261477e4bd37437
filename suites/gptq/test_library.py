"""The maintained GPTQ library against the reference, its checkpoints, and today's truth about auto-gptq.

* **GPTQModel** 7.6 (auto-gptq's maintained successor; transformers' ``GPTQConfig`` and optimum
  quantize through it) quantizes the real model on the reference's calibration tokens, decoder
  layers and settings (``suites/helpers/gptq_cases.py``: ``LIBRARY_SETTINGS``; why it is driven directly
  rather than through ``GPTQConfig``: ``scalellm.gptq_library``), on its pure-torch kernel, saves
  the checkpoint and reloads it. Each quantized linear of the reloaded model is read back
  (``gptq_library.dequantized_weight``) and its layer error ``||WX - ŴX||²`` on the fp32 model's
  own calibration activations is held to the reference's within ``ERROR_FACTOR`` both ways.
* A loaded checkpoint saved again reloads to identical logits; the reloaded model generates.
* Two GPTQModel 7.6 bugs found here are held by strict xfails: the model ``quantize()`` leaves in
  memory computes with zero points in the wrong format, and a loaded model computes NaN after ``save()``.
* Importing GPTQModel 7.6 changes the process's environment (``PYTORCH_ALLOC_CONF``, which sets the
  CUDA allocator of every process started from it): a strict xfail holds that too.
* **auto-gptq** 0.7.1 (end of life since 2024-03) fails at import under transformers 5.x.
"""

from __future__ import annotations

import importlib.util

import pytest

from scalellm import generate, gptq_library
from scalellm.baselines import Tolerance
from suites.helpers.gptq_cases import LIBRARY_METHOD, LIBRARY_SETTINGS, WINDOW, Spec
from suites.helpers import imports
from suites.helpers.isolation import Worker
from suites.helpers.packages import need
from suites.helpers.quality_rows import record_quality_rows

pytestmark = [pytest.mark.gptq, pytest.mark.reference]

#: The reference run with the library's settings (test_quality's 4-bit row).
REFERENCE = Spec("gptq", LIBRARY_SETTINGS.bits, LIBRARY_SETTINGS.group_size, LIBRARY_SETTINGS.sym,
                 LIBRARY_SETTINGS.desc_act)
#: Library / reference layer error, per linear, must lie in [1/F, F]. Measured (cpu, 35 linears of
#: layers 0/6/12/18/24, N=4 runs, identical): 0.990-1.038, geomean 1.007. The two differ only in
#: allowed ways: the library runs the model in bf16 (its calibration activations, so its Hessians, are
#: bf16 roundings; the reloaded scales are bf16 roundings of the checkpoint's fp16 ones) and
#: accumulates in another order. 1.25 leaves 6x that room and is far below what a broken library
#: gives: RTN is ~7x the reference's error on these layers (test_quality), the zero-point bug held
#: by the first xfail below gives 43-477x.
ERROR_FACTOR = 1.25
RATIO_TOL = Tolerance(rel=0.02, why="deterministic on a device (4 runs identical); 2% for kernel/BLAS order")
#: Tokens of the evaluation corpus whose logits are compared (one quarter window: cheap, 2 x 128 x 49k logits).
LOGIT_TOKENS = WINDOW // 4
#: Greedy generation from the reloaded model: a fact SmolLM2 states under every method (suites/model).
FACT_PROMPT, FACT_ANSWER = "The capital of France is", "Paris"
NEW_TOKENS = 8


def logits(model, ids: list[int]):
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits.float().cpu()


def layer_error_ratios(linears: dict, errors_of, yardstick) -> dict[str, float]:
    """Per linear: ``||WX - ŴX||²`` of ``linears[name]`` over ``errors_of(name)``, on the fp32 Hessians."""
    from scalellm.quant.gptq import reconstruction_error

    return {name: reconstruction_error(yardstick.weights[name], gptq_library.dequantized_weight(linears[name]), h)
            / errors_of(name) for name, h in yardstick.hessians.items()}


def reference_errors(device, real_runs, yardstick):
    from scalellm.quant.gptq import reconstruction_error

    weights = real_runs.run(device, REFERENCE).weights
    return {name: reconstruction_error(yardstick.weights[name], weights[name], h)
            for name, h in yardstick.hessians.items()}


def geomean(values) -> float:
    import math

    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def table(ratios: dict[str, float]) -> str:
    return "\n".join(f"  {name:40s} {r:8.3f}" for name, r in ratios.items())


def test_library_quantizes_the_reference_linears_on_the_torch_kernel(device, library_runs, real_runs,
                                                                      record_property):
    """Exactly the linears the reference quantizes (QUANT_LAYERS) are GPTQ linears, all on ``TorchLinear``."""
    linears = gptq_library.quantized_linears(library_runs.reloaded(device))
    kernels = sorted({type(m).__name__ for m in linears.values()})
    record_property("gptq_kernel", ",".join(kernels))
    assert set(linears) == set(real_runs.yardstick(device).hessians)
    assert kernels == [gptq_library.KERNEL]
    assert {(m.bits, m.group_size) for m in linears.values()} == {(LIBRARY_SETTINGS.bits, LIBRARY_SETTINGS.group_size)}


def test_library_layer_error_agrees_with_reference(device, library_runs, real_runs, record_metric):
    yardstick = real_runs.yardstick(device)
    ours = reference_errors(device, real_runs, yardstick)
    linears = gptq_library.quantized_linears(library_runs.reloaded(device))
    ratios = layer_error_ratios(linears, ours.__getitem__, yardstick)
    print(f"library / reference layer error ({device}):\n{table(ratios)}")
    record_metric("library_over_reference_layer_error_geomean", geomean(ratios.values()), unit="ratio",
                  better="equal", tolerance=RATIO_TOL)
    record_metric("library_over_reference_layer_error_max", max(ratios.values()), unit="ratio", better="lower",
                  tolerance=RATIO_TOL)
    bad = {n: r for n, r in ratios.items() if not 1 / ERROR_FACTOR <= r <= ERROR_FACTOR}
    assert not bad, f"outside [1/{ERROR_FACTOR}, {ERROR_FACTOR}]:\n{table(bad)}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "gptqmodel 7.6.0: quantize() packs the GPTQ v1 (checkpoint) zero points and leaves the modules at "
    "qzero_format 1, but TorchLinear (REQUIRES_FORMAT_V2) dequantizes them as v2, one step off per group: "
    "layer error 43-477x the reloaded checkpoint's (cpu). Save and reload first."))
def test_model_left_by_quantize_computes_like_its_checkpoint(device, library_runs, real_runs):
    yardstick = real_runs.yardstick(device)
    in_memory = gptq_library.quantized_linears(library_runs.quantized(device).qmodel.model)
    reloaded = gptq_library.quantized_linears(library_runs.reloaded(device))
    checkpoint = layer_error_ratios(reloaded, lambda name: 1.0, yardstick)
    ratios = layer_error_ratios(in_memory, checkpoint.__getitem__, yardstick)
    bad = {n: r for n, r in ratios.items() if not 1 / ERROR_FACTOR <= r <= ERROR_FACTOR}
    formats = sorted({m.qzero_format() for m in in_memory.values()})
    assert not bad, f"in memory / reloaded layer error (qzero formats {formats}):\n{table(bad)}"


@pytest.fixture(scope="session")
def _round_trips():
    return {}


@pytest.fixture
def round_trip(device, library_runs, eval_ids, tmp_path_factory, _round_trips):
    """Logits of a loaded checkpoint: as loaded, after its own ``save()``, and reloaded from that save."""
    if device not in _round_trips:
        ids = eval_ids[:LOGIT_TOKENS]
        qmodel = library_runs.fresh(device)
        loaded = logits(qmodel.model, ids)
        saved = gptq_library.save(qmodel, tmp_path_factory.mktemp(f"gptq-resaved-{device}"))
        after_save = logits(qmodel.model, ids)
        del qmodel
        _round_trips[device] = dict(loaded=loaded, after_save=after_save,
                                    reloaded=logits(gptq_library.load(saved, device).model, ids))
    return _round_trips[device]


def test_saved_checkpoint_reloads_to_identical_logits(round_trip):
    """Load, save, load again: the same logits, bit for bit."""
    import torch

    loaded, reloaded = round_trip["loaded"], round_trip["reloaded"]
    assert torch.equal(loaded, reloaded), f"max |Δlogit| {(loaded - reloaded).abs().max():.3g}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "gptqmodel 7.6.0: save() swaps a loaded model's TorchLinear modules for repacked ones of GPTQModel's "
    "default kernel (TorchAtenLinear on cpu: v1 zero points, fp16 scales), ignoring the backend it was "
    "loaded with: the saved-from model's logits are then NaN (cpu)."))
def test_loaded_model_still_computes_after_save(round_trip):
    import torch

    loaded, after = round_trip["loaded"], round_trip["after_save"]
    assert torch.equal(loaded, after), f"max |Δlogit| {(loaded - after).abs().max():.3g}"


def test_reloaded_model_decodes_as_transformers_generate(device, library_runs, tokenizer):
    """The timed greedy loop on the reloaded GPTQ model gives the tokens of ``generate(do_sample=False)``."""
    model = library_runs.reloaded(device)
    ids = tokenizer(FACT_PROMPT)["input_ids"]
    ours = generate.greedy(model, tokenizer, ids, NEW_TOKENS, device, stop_at_eos=False)
    assert ours.new_ids == generate.transformers_greedy_ids(model, tokenizer, ids, NEW_TOKENS, device)


def test_reloaded_model_answers_the_capital_of_france(device, library_runs, tokenizer, model_path):
    """SmolLM2 with five of its 30 layers GPTQ-quantized still completes the fact (suites/model's check)."""
    if model_path is not None:
        pytest.skip("a fact about SmolLM2; --model names another checkpoint")
    g = generate.greedy(library_runs.reloaded(device), tokenizer, tokenizer(FACT_PROMPT)["input_ids"], 3, device)
    assert g.text.split()[0].strip(".,") == FACT_ANSWER, g.text


@pytest.mark.quality
def test_library_rows_and_beats_round_to_nearest(device, library_runs, real_runs, eval_ids, record_metric):
    """The reloaded library model against fp32 on the evaluation corpus (suites/gptq/test_quality's
    measure and tolerances, kept in suites/helpers/bounds.py): its rows of the cross-method table, and
    a lower KLD than round-to-nearest at the same bits and group size on the same layers, as the
    reference has.

    Its figures include bf16 compute (TorchLinear refuses fp32; gptq_library's docstring), which alone
    costs about 0.001 nats of KLD on this model (docs/evidence.md: bf16 row of
    SmolLM2 quality by loading method), far below GPTQ's own error.
    """
    from scalellm import quality
    from suites.helpers.bounds import GPTQ_QUALITY_TOL

    q = quality.compare(library_runs.reloaded(device), eval_ids, real_runs.reference(device), device, WINDOW)
    rtn = real_runs.run(device, Spec("rtn", LIBRARY_SETTINGS.bits, LIBRARY_SETTINGS.group_size)).quality
    record_quality_rows(record_metric, LIBRARY_METHOD, q, **GPTQ_QUALITY_TOL)
    assert q.kld_mean < rtn.kld_mean, f"library GPTQ KLD {q.kld_mean:.4f} vs RTN {rtn.kld_mean:.4f}"


@pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "gptqmodel 7.6.0 sets PYTORCH_ALLOC_CONF=expandable_segments:True,max_split_size_mb:256,"
    "garbage_collection_threshold:0.7 and CUDA_DEVICE_ORDER=PCI_BUS_ID at import when they are unset "
    "(gptqmodel/models/auto.py); every CUDA process started afterwards inherits that allocator"))
def test_importing_gptqmodel_leaves_the_environment_alone():
    """Measured on an H200: with gptqmodel's allocator setting, TinyLlama's int8 prefill peaks 4.4% lower
    (``suites/helpers/isolation.py``), so a library's import moved another library's memory figure."""
    need("gptqmodel")
    with Worker() as worker:
        changed = worker.run(imports.environ_changes, "gptqmodel")
    assert changed == {}, f"importing gptqmodel changed the environment: {changed}"


def test_auto_gptq_fails_at_import_under_transformers_5():
    """auto-gptq 0.7.1 imports ``no_init_weights`` from ``transformers.modeling_utils``, where
    transformers 5 no longer has it."""
    import transformers

    if importlib.util.find_spec("auto_gptq") is None:
        pytest.skip("auto-gptq is not installed (end of life; 0.7.1 fails at import under transformers 5.x). "
                    "To record it: BUILD_CUDA_EXT=0 pip install --no-deps --no-build-isolation auto-gptq==0.7.1")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"transformers {transformers.__version__}: the documented failure is for 5.x")
    with pytest.raises(ImportError, match="no_init_weights"):
        importlib.import_module("auto_gptq")
