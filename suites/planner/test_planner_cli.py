"""``scalellm plan``: text and JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scalellm import cli, planner

pytestmark = [pytest.mark.memory]

#: argparse and our own errors exit 2 (the usage-error convention argparse uses).
USAGE_ERROR = 2


def run_main(capsys, *argv):
    code = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_carries_the_peak(capsys):
    code, out, _ = run_main(capsys, "llama-2-7b", "--method", "nf4", "--task", "qlora", "--seq", "1024",
                            "--batch", "2", "--grad-checkpointing", "--json")
    data = json.loads(out)
    expected = planner.plan("llama-2-7b", planner.Setting("nf4", "qlora", seq=1024, batch=2, grad_checkpointing=True))
    assert code == 0
    assert data["peak_GiB"] == round(expected.peak_gib, 3)
    assert set(data["parts_GiB"]) == set(planner.PART_NAMES)


def test_text_output_has_breakdown_comparisons_and_verdicts(capsys):
    code, out, _ = run_main(capsys, "tinyllama-1.1b", "--method", "bf16", "--budget", "8GiB")
    assert code == 0
    for needle in ("weights", "KV cache", "CUDA context", "predicted peak", "accelerate estimate-memory",
                   "rule of thumb", "8 GiB", "24 GiB", "budget 8 GiB"):
        assert needle in out


@pytest.mark.parametrize("argv,needle", [
    (["no-such-model"], "unknown model"),
    (["llama-2-7b", "--budget", "8XB"], "budget"),
    (["llama-2-7b", "--budget=-3GiB"], "budget"),  # argparse reads a bare -3GiB as an option
    (["llama-2-7b", "--method", "int3"], "unknown method"),
    (["llama-2-7b", "--task", "qlora", "--method", "bf16"], "quantized base"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, needle):
    code, out, err = run_main(capsys, *argv)
    assert code == USAGE_ERROR
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_a_config_missing_fields_is_exit_code_2(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "vocab_size": 100}')
    code, _, err = run_main(capsys, str(path))
    assert code == USAGE_ERROR and "hidden_size" in err and "num_hidden_layers" in err


def test_python_dash_m_scalellm_plan_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "scalellm", "plan", "smollm2-135m", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["peak_GiB"] > 0


def test_python_dash_m_scalellm_plan_exit_code_on_bad_model():
    proc = subprocess.run([sys.executable, "-m", "scalellm", "plan", "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == USAGE_ERROR
    assert proc.stderr.strip().splitlines()[-1].startswith("scalellm plan: error: unknown model")
