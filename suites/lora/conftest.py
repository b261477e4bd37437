"""Fixtures of the LoRA suites: the real model's checkpoint and one QLoRA run per device, shared.

Training is the expensive part on CPU, so one run per device (``trained(device)``) serves the loss,
adapter, merge and speed checks; tests that need a pristine model load their own.
"""

from __future__ import annotations

import pytest

from scalellm import train
from suites.helpers.lora_runs import config_for
from suites.helpers.packages import need


@pytest.fixture(scope="session")
def checkpoint(checkpoint):
    """The real model's local HF directory (the root fixture's path); skips without peft or bnb."""
    need("peft")
    need("bitsandbytes")
    return checkpoint.path


@pytest.fixture(scope="session")
def _runs():
    return {}


@pytest.fixture
def trained(checkpoint, _runs, device):
    """(peft model, tokenizer, TrainResult) of one QLoRA run on ``device``, made once per session.

    Tests must not train it further or merge it (``merge_and_unload`` changes the base in place).
    """
    if device not in _runs:
        _runs[device] = train.qlora(checkpoint, config_for(device), device)
    return _runs[device]
