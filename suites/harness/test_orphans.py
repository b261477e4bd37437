"""Orphaned baselines: stored entries whose test no longer exists are reported at the end of a run.

For every suite module collected in the run, the entries of its baseline files (every folder) whose
test key names no test collected from it (before ``-m``/``-k`` deselection) are listed in a terminal
section and written to ``results.json``; the run does not fail.
"""

from __future__ import annotations

import json

from scalellm.baselines import BaselineStore, Metric, Tolerance

ENV = {"python": "3.11.7", "torch": "2.13.0"}

DEMO = """
import pytest
from scalellm.baselines import Tolerance

TOL = Tolerance(rel=0.05, why="self-test")


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_kept(device, fmt, record_metric):
    record_metric("error", 1.0, unit="1", better="lower", tolerance=TOL)


@pytest.mark.devices("cuda")
def test_on_cuda(device, record_metric):
    record_metric("error", 1.0, unit="1", better="lower", tolerance=TOL)


def test_device_free():
    pass
"""

#: The section's lines for the two orphans of ``demo_suite`` (files relative to the rootdir).
ORPHAN_LINES = ["*= scalellm orphaned baselines =*",
                "WARNING: 2 stored baseline entries name tests that no longer exist: *--update-baselines removes them*",
                "  store/any/test_demo.json: test_removed[nf4] (error)",
                "  store/cpu-elsewhere/test_demo.json: test_renamed (error, speed)"]


def store_entries(suite, device_class: str, scope: str, *test_ids: str, names=("error",)) -> None:
    BaselineStore(suite.baselines).update(device_class, [
        Metric(f"suites/{test_id}", name, 1.0, "1", "lower", Tolerance(rel=0.05, why="demo"), None, scope)
        for test_id in test_ids for name in names], ENV)


def demo_suite(suite) -> None:
    """test_demo.py and a store with entries for its tests, two of which no longer exist, in three folders,
    and an entry of another module that this run does not collect."""
    suite.write("test_demo.py", DEMO)
    store_entries(suite, "cpu-recorder", "any", "test_demo.py::test_kept[cpu-nf4]",
                  "test_demo.py::test_removed[cpu-nf4]")
    store_entries(suite, "cuda-recorder", "kind", "test_demo.py::test_on_cuda[cuda]")  # exists; -m cpu deselects it
    store_entries(suite, "cpu-elsewhere", "class", "test_demo.py::test_renamed[cpu]", names=("error", "speed"))
    store_entries(suite, "cpu-recorder", "any", "test_other.py::test_gone[cpu]")  # its module is not collected


def assert_no_orphan_line(result) -> None:
    for name in ("test_kept", "test_on_cuda", "test_device_free", "test_gone"):
        result.stdout.no_fnmatch_line(f"  store/*: {name}*")


def test_entries_of_tests_that_no_longer_exist_are_reported_without_failing_the_run(suite):
    demo_suite(suite)
    result = suite.run("-m", "cpu")
    assert result.ret == 0
    result.assert_outcomes(passed=3, deselected=5)
    result.stdout.fnmatch_lines(ORPHAN_LINES)
    assert_no_orphan_line(result)


def test_a_keyword_deselection_calls_no_deselected_test_orphaned(suite):
    demo_suite(suite)
    result = suite.run("-k", "device_free")
    result.assert_outcomes(passed=1, deselected=7)
    result.stdout.fnmatch_lines(ORPHAN_LINES)
    assert_no_orphan_line(result)


def test_a_module_named_in_part_is_not_judged(suite):
    demo_suite(suite)
    result = suite.run("suites/test_demo.py::test_device_free")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*orphaned*")


def test_xdist_workers_send_what_they_collected(suite):
    demo_suite(suite)
    result = suite.run("-m", "cpu", "-n", "1")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(ORPHAN_LINES)
    assert_no_orphan_line(result)


def test_results_and_summary_list_the_orphans(suite):
    demo_suite(suite)
    out = suite.pytester.path / "run1"
    suite.run("-m", "cpu", "--report-dir", str(out)).assert_outcomes(passed=3, deselected=5)
    results = json.loads((out / "results.json").read_text())
    assert results["orphaned"] == [
        {"file": "store/any/test_demo.json", "applies_to": "any", "test": "test_removed[nf4]", "metrics": ["error"]},
        {"file": "store/cpu-elsewhere/test_demo.json", "applies_to": "cpu-elsewhere", "test": "test_renamed",
         "metrics": ["error", "speed"]}]
    summary = (out / "summary.md").read_text()
    assert "## Orphaned baselines" in summary
    assert "| store/cpu-elsewhere/test_demo.json | test_renamed | error, speed |" in summary


def test_a_store_without_orphans_says_nothing(suite):
    suite.write("test_demo.py", DEMO)
    store_entries(suite, "cpu-recorder", "any", "test_demo.py::test_kept[cpu-nf4]")
    store_entries(suite, "cuda-recorder", "kind", "test_demo.py::test_on_cuda[cuda]")
    result = suite.run("-m", "cpu")
    result.assert_outcomes(passed=3, deselected=5)
    result.stdout.no_fnmatch_line("*orphaned*")


def test_a_passing_update_run_removes_the_orphans_and_nothing_else(suite):
    demo_suite(suite)
    before = suite.baseline_files()
    result = suite.run("-m", "cpu", "--update-baselines")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["baseline removed (its test no longer exists): store/any/test_demo.json: "
                                 "test_removed[nf4] (error)"])
    after = suite.baseline_files()
    assert "cpu-elsewhere/test_demo.json" not in after  # its only entry was an orphan: the file goes
    assert set(after["any/test_demo.json"]["metrics"]) == set(before["any/test_demo.json"]["metrics"]) - {
        "test_removed[nf4]"}
    assert after["cuda/test_demo.json"] == before["cuda/test_demo.json"]  # deselected by -m cpu, not orphaned
    assert after["any/test_other.json"] == before["any/test_other.json"]  # its module was not collected
    result = suite.run("-m", "cpu")
    result.stdout.no_fnmatch_line("*scalellm orphaned baselines*")


def test_a_failing_update_run_removes_no_orphan(suite):
    demo_suite(suite)
    suite.write("test_fails.py", "def test_fails():\n    assert False\n")
    before = suite.baseline_files()
    result = suite.run("-m", "cpu", "--update-baselines")
    assert result.ret == 1
    assert suite.baseline_files()["cpu-elsewhere/test_demo.json"] == before["cpu-elsewhere/test_demo.json"]
    result.stdout.fnmatch_lines(ORPHAN_LINES[:2])
