"""A crash in a library call fails that test, names the signal and the test, and the run goes on with
a complete report (``suites/helpers/crashes.py``: pytest-xdist's worker, our faulthandler file)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("xdist")

ROOT = Path(__file__).resolve().parents[2]

CRASHING = """
import ctypes
import os

def test_before():
    pass

def test_a_library_call_crashes():
    {crash}

def test_after():
    pass
"""
#: How native code dies: an assertion (abort) and a bad pointer (segfault), and the line that names it.
CRASHES = {"abort": ("os.abort()", "Aborted"),
           "segfault": ("ctypes.string_at(0)", "Segmentation fault")}


@pytest.mark.parametrize("how", list(CRASHES))
def test_a_crash_fails_its_test_naming_the_signal_and_the_run_goes_on(suite, tmp_path, how):
    crash, signal_name = CRASHES[how]
    suite.write("test_crash.py", CRASHING.format(crash=crash))
    result = suite.run("-n", "1", "--report-dir", str(tmp_path / "report"))
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([f"*crashed: {signal_name} in worker gw* while running *test_a_library_call_crashes*; "
                                 "the run went on in a fresh worker*"])
    run = json.loads((tmp_path / "report" / "results.json").read_text())
    outcomes = {t["nodeid"].rsplit("::", 1)[-1]: (t["outcome"], t["reason"]) for t in run["tests"]}
    assert outcomes["test_before"][0] == outcomes["test_after"][0] == "passed"
    outcome, reason = outcomes["test_a_library_call_crashes"]
    assert outcome == "failed" and reason.startswith(f"crashed: {signal_name}"), (outcome, reason)
    assert (tmp_path / "report" / "summary.md").is_file()


def test_scalellm_check_runs_the_tests_in_a_worker(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scalellm", "check", "--device", "cpu", "--reports", str(tmp_path),
                           "--", "-p", "no:cacheprovider", "-o", "testpaths=suites/harness/test_stats.py",
                           "-k", "few_samples"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " -n 1" in done.stdout and "1 worker [1 item]" in done.stdout, done.stdout[-3000:]
