"""The shared device parametrization: markers, skip reasons, --require-device, exit codes."""

from __future__ import annotations

DEVICE_TEST = """
def test_runs_on(device):
    assert device in ("cpu", "cuda", "mps")
"""


def test_each_device_case_carries_its_marker(suite):
    suite.write("test_demo.py", DEVICE_TEST)
    result = suite.run("--collect-only", "-q", "-m", "cpu")
    result.stdout.fnmatch_lines(["*test_runs_on[[]cpu[]]*", "*1/3 tests collected (2 deselected)*"])


def test_an_absent_device_skips_with_one_clear_reason(suite, monkeypatch):
    monkeypatch.setenv("SCALELLM_DEVICES", "cpu")  # simulate a machine without cuda
    suite.write("test_demo.py", DEVICE_TEST)
    result = suite.run("-m", "cuda", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*cuda: *"])
    assert result.ret == 0


def test_require_device_turns_the_skip_into_an_error(suite, monkeypatch):
    monkeypatch.setenv("SCALELLM_DEVICES", "cpu")
    suite.write("test_demo.py", DEVICE_TEST)
    result = suite.run("-m", "cuda", "--require-device")
    result.assert_outcomes(errors=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*--require-device: cuda: *"])


def test_a_device_expression_selecting_nothing_exits_zero(suite):
    suite.write("test_demo.py", "def test_host_only():\n    assert True\n")
    assert suite.run("-m", "mps").ret == 0


def test_other_empty_selections_keep_pytest_exit_5(suite):
    suite.write("test_demo.py", "def test_host_only():\n    assert True\n")
    assert suite.run("-m", "gguf").ret == 5


def test_devices_marker_restricts_the_parametrization(suite):
    suite.write("test_demo.py", "import pytest\n\n@pytest.mark.devices('cuda')\n" + DEVICE_TEST)
    result = suite.run("--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_runs_on[[]cuda[]]*", "*1 test collected*"])


def test_an_unregistered_marker_is_an_error(suite):
    suite.write("test_demo.py", "import pytest\n\n@pytest.mark.nf5\ndef test_x():\n    pass\n")
    assert suite.run().ret != 0
