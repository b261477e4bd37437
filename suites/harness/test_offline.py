"""Nothing can reach a hub: conftest sets the offline switches before transformers is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: A hub load must fail by itself, long before this; the limit only keeps a hang from stalling CI.
HANG_GUARD_S = 120


def test_offline_switches_are_set():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_a_hub_load_fails_with_a_clear_message(tmp_path):
    code = "from transformers import AutoConfig; AutoConfig.from_pretrained('openai-community/gpt2')"
    env = {**os.environ, "HF_HOME": str(tmp_path)}  # an empty cache: nothing to fall back on
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert done.returncode != 0
    assert "offline" in done.stderr.lower() or "couldn't connect" in done.stderr.lower(), done.stderr[-2000:]


def test_scalellm_never_imports_pytest():
    code = ("import sys, scalellm, scalellm.baselines, scalellm.cli, scalellm.report, scalellm.stats; "
            "import pkgutil, importlib; [importlib.import_module(m.name) for m in "
            "pkgutil.walk_packages(scalellm.__path__, 'scalellm.') if m.name != 'scalellm.__main__']; "
            "assert 'pytest' not in sys.modules, 'pytest imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_each_switch_reaches_subprocesses(var):
    done = subprocess.run([sys.executable, "-c", f"import os; print(os.environ.get('{var}'))"],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.stdout.strip() == "1"
