"""record_metric end to end: new, pass, fail, --update-baselines, interrupted runs, bad files, xdist."""

from __future__ import annotations

import json

from scalellm import devices

METRIC_TEST = """
import os
from scalellm.baselines import Tolerance

def test_figure(record_metric):
    record_metric("error", float(os.environ["VALUE"]), unit="1", better="lower",
                  tolerance=Tolerance(rel=0.05, why="self-test"))
    assert os.environ.get("BREAK") != "1", "the test's own assertion failed"
"""



def stored(suite) -> float:
    files = suite.baseline_files()
    [data] = files.values()
    return data["metrics"]["test_figure"]["error"]["value"]


def run_with(suite, monkeypatch, value, *args, broken=False):
    monkeypatch.setenv("VALUE", str(value))
    monkeypatch.setenv("BREAK", "1" if broken else "0")
    return suite.run(*args)


def test_a_figure_without_baseline_is_reported_new(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    result = run_with(suite, monkeypatch, 1.0)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["NEW*'error'*is new (no baseline at *; scope class)*", "figures: 1 new (class 1)*",
                                 "*Record them with `scalellm check --update-baselines`*"])
    assert suite.baseline_files() == {}


def test_update_writes_then_the_same_figure_passes(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    run_with(suite, monkeypatch, 1.0, "--update-baselines").assert_outcomes(passed=1)
    assert stored(suite) == 1.0
    result = run_with(suite, monkeypatch, 1.04)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["figures: 1 pass (class 1)"])


def test_a_regression_fails_naming_metric_baseline_tolerance_and_value(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    run_with(suite, monkeypatch, 1.0, "--update-baselines")
    result = run_with(suite, monkeypatch, 1.2)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*metric 'error' of *test_figure*: measured 1.2 1, baseline 1 1, "
                                 "tolerance rel 0.05 (self-test)*"])


def test_update_after_a_failing_test_leaves_its_baseline_untouched(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    run_with(suite, monkeypatch, 1.0, "--update-baselines")
    before = suite.baseline_files()
    result = run_with(suite, monkeypatch, 7.0, "--update-baselines", broken=True)
    result.assert_outcomes(failed=1)
    assert suite.baseline_files() == before


def test_update_accepts_a_moved_figure_from_a_passing_test(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    run_with(suite, monkeypatch, 1.0, "--update-baselines")
    run_with(suite, monkeypatch, 2.0, "--update-baselines").assert_outcomes(passed=1)
    assert stored(suite) == 2.0


def test_an_interrupted_run_writes_no_baseline(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST + "\n\ndef test_zz_interrupt():\n    raise KeyboardInterrupt\n")
    result = run_with(suite, monkeypatch, 1.0, "--update-baselines")
    assert result.ret == 2  # pytest's INTERRUPTED
    assert suite.baseline_files() == {}


def test_a_corrupted_baseline_file_fails_the_run_naming_the_file(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    bad = suite.baselines / "cpu-x86_64" / "test_demo.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": "scalellm.baselines/1", "device_class"')
    result = run_with(suite, monkeypatch, 1.0)
    assert result.ret != 0
    result.stderr.fnmatch_lines([f"*bad baseline file: {bad}: not valid JSON*"])


def test_updates_from_xdist_workers_all_land(suite, monkeypatch):
    many = "\n".join(
        f"def test_f{i}(record_metric):\n    record_metric('v', {i}.0, unit='1', better='lower', "
        f"tolerance=Tolerance(rel=0.05, why='self-test'))\n" for i in range(6))
    suite.write("test_demo.py", "from scalellm.baselines import Tolerance\n\n" + many)
    result = suite.run("-n", "2", "--update-baselines")
    result.assert_outcomes(passed=6)
    [data] = suite.baseline_files().values()
    assert {k: v["v"]["value"] for k, v in data["metrics"].items()} == {f"test_f{i}": float(i) for i in range(6)}


def test_report_dir_gets_results_and_summary(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    out = suite.pytester.path / "run1"
    run_with(suite, monkeypatch, 1.0, "--report-dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert [m["status"] for m in results["metrics"]] == ["new"]
    summary = (out / "summary.md").read_text()
    assert f"| NEW | {devices.device_class('cpu')} | test_figure | error | 1 | — | none at class |" in summary
    assert "figures: 1 new (class 1)" in summary


# ---- scopes: a machine that never recorded a class baseline

SCOPED_TEST = """
import os
from scalellm.baselines import Tolerance

def test_figure(record_metric):
    record_metric("{name}", float(os.environ["VALUE"]), unit="1", better="lower",
                  tolerance=Tolerance(rel=0.05, why="self-test"))
"""


def scoped_suite(suite):
    """model.test_attention's figures are scope kind, model.test_generation's class (suites/helpers/scopes.py)."""
    suite.write("model/test_attention.py", SCOPED_TEST.format(name="max_abs_dlogit_eager_vs_sdpa"))
    suite.write("model/test_generation.py", SCOPED_TEST.format(name="decode_tok_s"))


def test_another_class_checks_kind_figures_and_reports_class_figures_new(suite, monkeypatch):
    scoped_suite(suite)
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-recorder")
    run_with(suite, monkeypatch, 1.0, "--update-baselines").assert_outcomes(passed=2)
    assert sorted(suite.baseline_files()) == ["cpu-recorder/model.test_generation.json", "cpu/model.test_attention.json"]
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-elsewhere")
    result = run_with(suite, monkeypatch, 1.01)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["NEW*'decode_tok_s'*no baseline at cpu-elsewhere; scope class*",
                                 "figures: 1 new (class 1) · 1 pass (kind 1)",
                                 "*(class cpu-elsewhere has no baselines for them)*"])


def test_a_kind_figure_fails_on_another_class_naming_where_its_baseline_came_from(suite, monkeypatch):
    scoped_suite(suite)
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-recorder")
    run_with(suite, monkeypatch, 1.0, "--update-baselines")
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-elsewhere")
    result = run_with(suite, monkeypatch, 2.0)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*'max_abs_dlogit_eager_vs_sdpa'*measured 2 1, baseline 1 1*"
                                 "baseline from kind cpu, recorded on cpu-recorder*", "*scope kind: *"])


def test_update_levels_class_writes_only_this_machines_class_figures(suite, monkeypatch):
    scoped_suite(suite)
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-recorder")
    run_with(suite, monkeypatch, 1.0, "--update-baselines")
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-elsewhere")
    result = run_with(suite, monkeypatch, 2.0, "--update-baselines", "--update-levels", "class")
    result.assert_outcomes(passed=1, failed=1)  # the kind figure is checked, not overwritten
    files = suite.baseline_files()
    assert sorted(files) == ["cpu-elsewhere/model.test_generation.json", "cpu-recorder/model.test_generation.json",
                             "cpu/model.test_attention.json"]
    assert files["cpu/model.test_attention.json"]["metrics"]["test_figure"]["max_abs_dlogit_eager_vs_sdpa"]["value"] \
        == 1.0


def test_a_malformed_device_class_override_stops_the_run(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "gpu-x")
    result = run_with(suite, monkeypatch, 1.0)
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*SCALELLM_DEVICE_CLASS='gpu-x': 'gpu-x' is not a device class*"])
