"""Fixtures of the GPTQ suite: the real model, calibration and evaluation tokens, quantized copies.

Calibration and evaluation never share text: calibration is the instruction set
(``scalellm.text.instruction_set``: docstrings of ``INSTRUCT_MODULES``), evaluation the first
``EVAL_TOKENS`` of ``scalellm.text.eval_corpus`` (docstrings of the disjoint ``EVAL_MODULES``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from scalellm import gptq_library, quality, text
from suites.helpers.gptq_cases import (CALIB_LENGTH, CALIB_SEQUENCES, EVAL_TOKENS, LIBRARY_SETTINGS,
                                      QUANT_LAYERS, WINDOW, Spec)
from suites.helpers.packages import need


def calibration_ids(tokenizer, sequences: int = CALIB_SEQUENCES, length: int = CALIB_LENGTH):
    """(sequences, length) int64 token ids of the instruction set, prompt and answer, concatenated."""
    import torch

    examples, _ = text.instruction_set()
    joined = "\n\n".join(f"{e['prompt']}\n{e['response']}" for e in examples)
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
    if len(ids) < sequences * length:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {sequences * length}")
    return torch.tensor(ids[: sequences * length]).reshape(sequences, length)


@pytest.fixture(scope="session")
def calib_ids(tokenizer):
    return calibration_ids(tokenizer)


@pytest.fixture(scope="session")
def eval_ids(tokenizer) -> list[int]:
    return text.eval_corpus(tokenizer, EVAL_TOKENS).ids


def load_fp32(path, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", local_files_only=True)
    return model.to(device).eval()


def rtn_layers(model, spec: Spec, layers) -> list:
    """Round-to-nearest every linear of decoder ``layers`` in place (no calibration, no reports)."""
    import torch

    from scalellm.quant.rtn import rtn_quantize_linear

    with torch.no_grad():
        for index in layers:
            for module in model.model.layers[index].modules():
                if isinstance(module, torch.nn.Linear):
                    Q = rtn_quantize_linear(module.weight.data, spec.bits, spec.group_size, spec.sym)[0]
                    module.weight.data = Q.to(module.weight.dtype)
    return []


@dataclass
class Run:
    """What one quantization of the real model gave."""

    spec: Spec
    quality: quality.Quality  # against the fp32 reference on eval_ids
    reports: list  # scalellm.quant.gptq.LinearReport per linear (GPTQ only)
    seconds: float  # wall time of quantize_model
    weights: dict = field(default_factory=dict)  # linear name -> dequantized Q, float32 on cpu (GPTQ only)


@dataclass
class Yardstick:
    """The fp32 model's own view of the quantized linears: the common scale for two quantizations."""

    weights: dict  # linear name -> fp32 W (out, in), on the device
    hessians: dict  # linear name -> scalellm.quant.gptq.Hessian of its inputs on the calibration tokens


class RealModelRuns:
    """Each Spec quantized and evaluated once per (device, spec); fp32 reference logits per device."""

    def __init__(self, path, calib_ids, eval_ids):
        self.path, self.calib_ids, self.eval_ids = path, calib_ids, eval_ids
        self._reference: dict[str, list] = {}
        self._runs: dict[tuple[str, Spec], Run] = {}
        self._yardsticks: dict[str, Yardstick] = {}

    def reference(self, device: str) -> list:
        if device not in self._reference:
            model = load_fp32(self.path, device)
            self._reference[device] = quality.reference_logits(model, self.eval_ids, device, WINDOW)
        return self._reference[device]

    def run(self, device: str, spec: Spec) -> Run:
        key = (device, spec)
        if key not in self._runs:
            from scalellm.quant.gptq import quantize_model

            reference = self.reference(device)
            model = load_fp32(self.path, device)
            start = time.perf_counter()
            if spec.method == "rtn":  # needs no calibration pass: round the weights where they are
                reports = rtn_layers(model, spec, QUANT_LAYERS)
            else:
                reports = quantize_model(model, self.calib_ids, bits=spec.bits, group_size=spec.group_size,
                                         sym=spec.sym, act_order=spec.act_order, layers=QUANT_LAYERS)
            seconds = time.perf_counter() - start
            weights = {r.name: model.get_submodule(r.name).weight.detach().float().cpu() for r in reports}
            q = quality.compare(model, self.eval_ids, reference, device, WINDOW)
            self._runs[key] = Run(spec, q, reports, seconds, weights)
            del model
        return self._runs[key]

    def yardstick(self, device: str) -> Yardstick:
        """fp32 weights and input Hessians of every linear of QUANT_LAYERS, from one pass of the fp32
        model over the calibration tokens (``scalellm.quant.gptq.linear_hessians``)."""
        if device not in self._yardsticks:
            from scalellm.quant.gptq import linear_hessians

            model = load_fp32(self.path, device)
            hessians = linear_hessians(model, self.calib_ids, list(QUANT_LAYERS))
            weights = {name: model.get_submodule(name).weight.detach().clone() for name in hessians}
            self._yardsticks[device] = Yardstick(weights, hessians)
        return self._yardsticks[device]


@pytest.fixture(scope="session")
def real_runs(checkpoint, calib_ids, eval_ids):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    runs = RealModelRuns(checkpoint.path, calib_ids, eval_ids)
    yield runs
    runs._reference.clear()
    runs._runs.clear()
    runs._yardsticks.clear()


# ---------------------------------------------------------------- the library path (GPTQModel)

class LibraryRuns:
    """GPTQModel's quantization of the real model, once per device, saved; reloads of the checkpoint.

    ``quantized(device)``: the run (its model in memory and its time); ``saved(device)``: the
    checkpoint directory; ``reloaded(device)``: one shared reload (callers must not change it);
    ``fresh(device)``: a new reload the caller owns (to train, or to save again).
    """

    def __init__(self, path, calib_ids, root):
        self.path, self.calib_ids, self.root = path, calib_ids, root
        self._quantized: dict[str, gptq_library.Quantized] = {}
        self._reloaded: dict[str, object] = {}

    def quantized(self, device: str) -> gptq_library.Quantized:
        if device not in self._quantized:
            run = gptq_library.quantize(self.path, self.calib_ids, LIBRARY_SETTINGS, device,
                                        log_dir=self.root / "logs")
            gptq_library.save(run.qmodel, self.root / device)
            self._quantized[device] = run
        return self._quantized[device]

    def saved(self, device: str):
        self.quantized(device)
        return self.root / device

    def fresh(self, device: str):
        """A new reload of the saved checkpoint (GPTQModel's wrapper; ``.model`` is the transformers model)."""
        return gptq_library.load(self.saved(device), device)

    def reloaded(self, device: str):
        if device not in self._reloaded:
            self._reloaded[device] = self.fresh(device).model
        return self._reloaded[device]


@pytest.fixture(scope="session")
def library_runs(checkpoint, calib_ids, tmp_path_factory):
    need("gptqmodel")
    runs = LibraryRuns(checkpoint.path, calib_ids, tmp_path_factory.mktemp("gptqmodel"))
    yield runs
    runs._quantized.clear()
    runs._reloaded.clear()
