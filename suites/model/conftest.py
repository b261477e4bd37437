"""Session fixtures of the real-model tier: the checkpoint, its tokenizer, the evaluation corpus,
each loading method loaded once per (method, device), and the fp32 reference logits per device."""

from __future__ import annotations

import pytest

from scalellm import load, quality, text
from suites.helpers.packages import need
from suites.helpers.methods import COMPUTE_DTYPE

#: Evaluation budget: 2,048 tokens = four windows of 512 (scalellm.text.EVAL_TOKENS), the budget and
#: window of the orientation figures (docs/evidence.md: SmolLM2 quality by loading method).
EVAL_TOKENS = text.EVAL_TOKENS
WINDOW = quality.WINDOW


@pytest.fixture(scope="session")
def corpus(tokenizer):
    return text.eval_corpus(tokenizer, EVAL_TOKENS)


class ModelCache:
    """Each (method, device, attention) loaded once per session; the fp32 reference logits per device."""

    def __init__(self, path):
        self.path = path
        self._models: dict[tuple, tuple] = {}
        self._reference: dict[tuple, list] = {}

    def get(self, method_name: str, device: str, attn_implementation: str | None = None):
        """(model, :class:`scalellm.load.Loaded`)."""
        key = (method_name, device, attn_implementation)
        if key not in self._models:
            if load.method(method_name).quantized:
                need("bitsandbytes")
            self._models[key] = load.load(self.path, method_name, device, COMPUTE_DTYPE,
                                          attn_implementation=attn_implementation)
        return self._models[key]

    def model(self, method_name: str, device: str):
        return self.get(method_name, device)[0]

    def reference(self, device: str, ids: list[int]) -> list:
        """fp32 logits of ``ids`` per window (:func:`scalellm.quality.reference_logits`)."""
        key = (device, tuple(ids))
        if key not in self._reference:
            self._reference[key] = quality.reference_logits(self.model("fp32", device), ids, device, WINDOW)
        return self._reference[key]


@pytest.fixture(scope="session")
def models_cache(checkpoint):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cache = ModelCache(checkpoint.path)
    yield cache
    cache._models.clear()
    cache._reference.clear()
