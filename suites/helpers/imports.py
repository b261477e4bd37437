"""What importing a library does to the process, measured in a child that has imported nothing else.

Run by :class:`suites.helpers.isolation.Worker` (a fresh ``spawn`` child started with the session's
starting environment), so the answer is the library's own, not that of what the tests imported before.
"""

from __future__ import annotations

import importlib
import os


def environ_changes(module: str) -> dict[str, tuple[str | None, str | None]]:
    """Import ``module`` and return every ``os.environ`` variable it set, changed or removed:
    ``{name: (before, after)}``, ``None`` for unset."""
    before = dict(os.environ)
    importlib.import_module(module)
    return _changes(before, dict(os.environ))


def environ_changes_creating_a_lora_model() -> dict[str, tuple[str | None, str | None]]:
    """What ``peft.get_peft_model`` of a one-linear model does to ``os.environ`` (the changes, as
    :func:`environ_changes`): peft looks for optional backends when it dispatches LoRA layers."""
    before = dict(os.environ)
    import peft
    import torch

    peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), peft.LoraConfig(r=2, target_modules=["0"]))
    return _changes(before, dict(os.environ))


def _changes(before: dict[str, str], after: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    return {name: (before.get(name), after.get(name))
            for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)}
