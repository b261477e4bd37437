"""Path options outside the checkout, written ``--opt PATH`` as users type them (scalellm_pytest.py).

pytest picks its rootdir before it knows the suite's options and takes an existing path after an
unknown flag for a test path (pytest-dev/pytest#8846). The runs here are real command lines, in a
subprocess from the repository root (pytester's in-process runs never read ``sys.argv``); their paths
exist beforehand and lie outside the checkout, which is what misleads pytest. ``-o testpaths=...``
keeps each run small without a test path on the command line: a test path inside the checkout would
lead pytest back to the checkout's ``pyproject.toml`` and hide the fault.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import scalellm_pytest

ROOT = Path(__file__).resolve().parents[2]
#: A small selection of quick device-free tests (numpy only), named by ini override, not by path.
SMALL = ["-o", "testpaths=suites/harness/test_stats.py", "-k", "interval or few_samples"]
SMALL_IDS = {"suites/harness/test_stats.py::test_the_interval_brackets_the_point_ratio",
             "suites/harness/test_stats.py::test_too_few_samples_is_an_error"}
#: A stuck run fails the test instead of stalling CI; each run takes a few seconds.
HANG_GUARD_S = 120
#: How users start pytest: ``python -m pytest`` and the ``pytest`` script (their command lines differ).
LAUNCHERS = {"module": [sys.executable, "-m", "pytest"], "script": [str(Path(sys.executable).with_name("pytest"))]}


@pytest.fixture
def outside(tmp_path_factory) -> Path:
    """An existing directory outside the checkout."""
    path = tmp_path_factory.mktemp("outside")
    assert ROOT not in path.parents, f"--basetemp must lie outside {ROOT} for these tests to mean anything"
    return path


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert "unrecognized arguments" not in done.stderr, done.stderr[-3000:]
    return done


def assert_checkout_rootdir(done: subprocess.CompletedProcess) -> None:
    """The run's header names the checkout as rootdir and its pyproject.toml as config file."""
    __tracebackhide__ = True
    assert f"rootdir: {ROOT}\n" in done.stdout and "configfile: pyproject.toml\n" in done.stdout, done.stdout[:3000]


def node_ids(run_folder: Path) -> set[str]:
    return {test["nodeid"] for test in json.loads((run_folder / "results.json").read_text())["tests"]}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_baseline_dir_outside_the_checkout_is_read_by_a_run_rooted_in_the_checkout(outside, launcher):
    if not Path(LAUNCHERS[launcher][0]).is_file():
        pytest.skip(f"no pytest script beside {sys.executable}")
    cmd = LAUNCHERS[launcher] + ["-p", "no:cacheprovider", "-m", "cpu", "--baseline-dir", str(outside)] + SMALL
    bad = outside / "any" / "harness.test_stats.json"
    bad.parent.mkdir()
    bad.write_text('{"schema": "scalellm.baselines/1", "device_class"')  # cut short: not valid JSON
    done = run(cmd)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"bad baseline file: {bad}: not valid JSON" in done.stderr, done.stderr[-3000:]
    # Read from there by a run rooted in the checkout: a rootdir taken from the store's path still
    # reaches this conftest, but leaves pyproject.toml unread (no addopts, markers or testpaths).
    bad.unlink()
    done = run(cmd + ["--collect-only"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_checkout_rootdir(done)


def test_report_dir_outside_the_checkout_gets_results_with_the_checkouts_node_ids(outside):
    done = run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cpu",
                "--report-dir", str(outside)] + SMALL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_checkout_rootdir(done)
    assert node_ids(outside) == SMALL_IDS  # baseline keys derive from these
    assert (outside / "summary.md").is_file()


@pytest.mark.parametrize("entry_point", ["installed", "not loaded"])
def test_check_reports_outside_the_checkout_gets_the_run_folder(outside, entry_point):
    # Without the pytest11 entry point (a checkout run as `python -m scalellm`, not installed), the
    # command's own pinned rootdir is what keeps pytest in the checkout.
    env = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"} if entry_point == "not loaded" else {}
    done = run([sys.executable, "-m", "scalellm", "check", "--device", "cpu", "--reports", str(outside), "--",
                "-p", "no:cacheprovider"] + SMALL, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_checkout_rootdir(done)
    [folder] = outside.iterdir()
    assert node_ids(folder) == SMALL_IDS
    assert {p.name for p in folder.iterdir()} >= {"results.json", "summary.md", "junit.xml"}


def test_an_in_process_run_that_cannot_be_started_again_says_to_write_opt_equals_path(pytester, outside):
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "scalellm_pytest", "--baseline-dir", str(outside))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*pytest-dev/pytest#8846*write --baseline-dir={outside}"])
    pytester.runpytest_inprocess("-p", "scalellm_pytest", f"--baseline-dir={outside}").assert_outcomes(passed=1)


def test_path_options_are_rewritten_up_to_a_double_dash():
    args = ["-m", "cpu", "--baseline-dir", "/b", "--report-dir=/r", "--model", "-k", "x", "--", "--model", "m"]
    assert scalellm_pytest.joined(args) == ["-m", "cpu", "--baseline-dir=/b", "--report-dir=/r", "--model", "-k",
                                            "x", "--", "--model", "m"]
    assert scalellm_pytest.spaced_paths(args) == [("--baseline-dir", "/b")]
    assert {"--baseline-dir", "--report-dir", "--model"} <= set(scalellm_pytest.PATH_OPTIONS)
