"""The baseline store: comparison semantics, files, atomic writes, bad files."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalellm import baselines, report
from scalellm.baselines import Baseline, BaselineError, BaselineStore, Metric, Tolerance, compare

ENV = {"torch": "2.13.0", "python": "3.11.7"}
TEST_ID = "suites/quality/test_demo.py::test_ppl[cpu]"


def metric(value, better="lower", tol=Tolerance(rel=0.05, why="demo"), samples=None, unit="1"):
    return Metric(TEST_ID, "ppl", value, unit, better, tol, samples)


def base(value, better="lower", samples=None, env=ENV, unit="1"):
    return Baseline(value, unit, better, samples, env)


# ---- comparison


def test_no_baseline_is_new_not_pass():
    assert compare(metric(1.0), None, ENV).status == "new"


@pytest.mark.parametrize("better, value, status", [
    ("lower", 10.4, "pass"), ("lower", 10.6, "fail"), ("lower", 5.0, "pass"),
    ("higher", 9.6, "pass"), ("higher", 9.4, "fail"), ("higher", 50.0, "pass"),
    ("equal", 10.4, "pass"), ("equal", 10.6, "fail"), ("equal", 9.4, "fail"),
])
def test_direction_decides_which_side_fails(better, value, status):
    assert compare(metric(value, better), base(10.0, better), ENV).status == status


def test_absolute_tolerance_covers_a_zero_baseline():
    tol = Tolerance(abs=0.01, why="demo")
    assert compare(metric(0.009, tol=tol), base(0.0), ENV).status == "pass"
    assert compare(metric(0.011, tol=tol), base(0.0), ENV).status == "fail"


def test_nan_always_fails():
    assert compare(metric(math.nan), base(1.0), ENV).status == "fail"
    assert compare(metric(math.nan), None, ENV).status == "fail"


def test_unit_mismatch_fails_and_says_so():
    verdict = compare(metric(1.0, unit="GiB"), base(1.0, unit="MiB"), ENV)
    assert verdict.status == "fail" and "'MiB'" in verdict.message


def test_failure_message_names_metric_baseline_tolerance_value_and_environment():
    verdict = compare(metric(12.0), base(10.0, env={**ENV, "torch": "2.12.0"}), ENV)
    assert verdict.status == "fail"
    for part in ("'ppl'", TEST_ID, "measured 12", "baseline 10", "rel 0.05 (demo)", "torch 2.12.0 -> 2.13.0"):
        assert part in verdict.message, part


@given(baseline=st.floats(1e-6, 1e6), frac=st.floats(0, 0.999), rel=st.floats(0.001, 0.5),
       better=st.sampled_from(baselines.DIRECTIONS), sign=st.sampled_from([-1, 1]))
def test_any_change_inside_the_tolerance_passes(baseline, frac, rel, better, sign):
    value = baseline * (1 + sign * frac * rel)
    assert compare(metric(value, better, Tolerance(rel=rel)), base(baseline, better), ENV).status == "pass"


@given(baseline=st.floats(1e-3, 1e6), excess=st.floats(1.01, 10), rel=st.floats(0.001, 0.5))
def test_any_worsening_beyond_the_tolerance_fails(baseline, excess, rel):
    worse = baseline * (1 + excess * rel)
    assert compare(metric(worse, "lower", Tolerance(rel=rel)), base(baseline, "lower"), ENV).status == "fail"


# ---- repeated samples (the noise-aware rule)

NOISE = [1.00, 1.01, 0.99, 1.02, 0.98, 1.005, 0.995, 1.015, 0.985, 1.0]


def test_samples_with_a_planted_slowdown_fail():
    slow = [x * 1.10 for x in NOISE]
    tol = Tolerance(rel=0.03, why="demo")
    verdict = compare(metric(1.10, "lower", tol, samples=slow), base(1.0, "lower", samples=NOISE), ENV)
    assert verdict.status == "fail" and "bootstrap interval" in verdict.message


def test_samples_of_a_clean_rerun_pass():
    rerun = list(reversed(NOISE))
    tol = Tolerance(rel=0.03, why="demo")
    assert compare(metric(1.0, "lower", tol, samples=rerun), base(1.0, "lower", samples=NOISE), ENV).status == "pass"


# ---- files

CLASS = "cpu-intel-xeon-amx-2c"


def test_update_then_get_round_trips(tmp_path):
    store = BaselineStore(tmp_path)
    store.update(CLASS, [metric(3.5)], ENV)
    got = BaselineStore(tmp_path).get(CLASS, TEST_ID, "ppl")
    assert (got.value, got.unit, got.better, got.environment) == (3.5, "1", "lower", ENV)
    assert (got.level, got.applies_to, got.recorded_on) == ("class", CLASS, CLASS)


def test_files_are_named_by_scope_and_suite_module_with_sorted_keys(tmp_path):
    [path] = BaselineStore(tmp_path).update(CLASS, [metric(3.5)], ENV)
    assert path == tmp_path / CLASS / "quality.test_demo.json"
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"
    assert list(json.loads(text)["metrics"]) == ["test_ppl"]  # the key has no device


def test_update_keeps_other_figures_of_the_file(tmp_path):
    store = BaselineStore(tmp_path)
    store.update(CLASS, [metric(3.5)], ENV)
    other = Metric(TEST_ID, "kld", 0.1, "nats", "lower", Tolerance(rel=0.1))
    store.update(CLASS, [other], {**ENV, "torch": "2.14.0"})
    fresh = BaselineStore(tmp_path)
    assert fresh.get(CLASS, TEST_ID, "ppl").environment == ENV
    assert fresh.get(CLASS, TEST_ID, "kld").environment["torch"] == "2.14.0"


def test_interrupted_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    store = BaselineStore(tmp_path)
    [path] = store.update(CLASS, [metric(3.5)], ENV)
    before = path.read_bytes()

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(baselines.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.update(CLASS, [metric(9.9)], ENV)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.suffix == ".tmp"] == []


# ---- scopes: where a baseline applies


@pytest.mark.parametrize("test_id, kind, key", [
    ("suites/a/test_b.py::t[cpu]", "cpu", "t"),
    ("suites/a/test_b.py::t[cuda-nf4]", "cuda", "t[nf4]"),
    ("suites/a/test_b.py::t[cpu-shape0-32]", "cpu", "t[shape0-32]"),
    ("suites/a/test_b.py::TestX::t[mps-fp4-float16]", "mps", "TestX::t[fp4-float16]"),
    ("suites/a/test_b.py::t[nf4]", "cpu", "t[nf4]"),
    ("suites/a/test_b.py::t", "cpu", "t"),
])
def test_keys_leave_out_the_device_so_devices_meet(test_id, kind, key):
    assert baselines.test_key(test_id, kind) == key


@pytest.mark.parametrize("scope, folders", [
    ("class", ("cuda-nvidia-h200",)),
    ("kind", ("cuda-nvidia-h200", "cuda")),
    ("any", ("cuda-nvidia-h200", "cuda", "any")),
])
def test_lookup_goes_class_kind_any_never_wider_than_the_scope(scope, folders):
    assert baselines.lookup_order("cuda-nvidia-h200", scope) == folders


def scoped(value, scope, kind="cpu", name="ppl"):
    return Metric(f"suites/quality/test_demo.py::test_ppl[{kind}]", name, value, "1", "lower",
                  Tolerance(rel=0.05, why="demo"), None, scope)


def test_a_kind_figure_recorded_on_one_class_is_checked_on_another(tmp_path):
    BaselineStore(tmp_path).update("cuda-nvidia-h100-80gb-hbm3", [scoped(2.0, "kind", "cuda")], ENV)
    got = BaselineStore(tmp_path).get("cuda-nvidia-h200", scoped(2.0, "kind", "cuda").test_id, "ppl", "kind")
    assert (got.value, got.level, got.applies_to, got.recorded_on) == (2.0, "kind", "cuda", "cuda-nvidia-h100-80gb-hbm3")
    verdict = compare(scoped(2.01, "kind", "cuda"), got, ENV)
    assert verdict.status == "pass" and "baseline from kind cuda, recorded on cuda-nvidia-h100-80gb-hbm3" in verdict.message


def test_a_class_figure_is_new_on_another_class_and_says_where_it_looked(tmp_path):
    BaselineStore(tmp_path).update("cuda-nvidia-h100-80gb-hbm3", [scoped(2.0, "class", "cuda")], ENV)
    figure = scoped(20.0, "class", "cuda")
    assert BaselineStore(tmp_path).get("cuda-nvidia-h200", figure.test_id, "ppl", "class") is None
    verdict = compare(figure, None, ENV, baselines.lookup_order("cuda-nvidia-h200", "class"))
    assert verdict.status == "new" and "no baseline at cuda-nvidia-h200" in verdict.message


ZEN3, ZEN2 = {**ENV, "cpu_model_id": "family 25 model 1"}, {**ENV, "cpu_model_id": "family 23 model 49"}


@pytest.mark.parametrize("recorded, here, status", [
    (ZEN3, ZEN3, "fail"),  # same CPU model: checked (and 2x slower fails)
    (ZEN3, ZEN2, "new"),  # another generation behind the same 'AMD EPYC' class: not checked
    (ENV, ZEN2, "fail"),  # recorded before the model id was kept: applies to its whole class
])
def test_a_cpu_class_figure_applies_only_to_the_cpu_model_that_recorded_it(tmp_path, recorded, here, status):
    BaselineStore(tmp_path).update("cpu-amd-epyc-avx2-2c", [scoped(2.0, "class")], recorded)
    got = BaselineStore(tmp_path).get("cpu-amd-epyc-avx2-2c", scoped(0, "class").test_id, "ppl", "class")
    verdict = compare(scoped(4.0, "class"), got, here)
    assert verdict.status == status
    if status == "new":
        assert "recorded on CPU family 25 model 1, this machine's is family 23 model 49" in verdict.message


def test_the_record_hint_tells_a_missing_class_from_another_cpu_model():
    new = [{"status": "new", "scope": "class", "device_class": "cpu-amd-epyc-avx2-2c", "level": level}
           for level in (None, "class", "class")]
    hint = report.record_hint(new)
    assert "3 figure(s) have no baseline here (class cpu-amd-epyc-avx2-2c has no baselines for them) " \
           "(2 of them were recorded on another CPU model of this class)" in hint


def test_a_cuda_class_figure_ignores_the_host_cpu_model(tmp_path):
    BaselineStore(tmp_path).update("cuda-nvidia-h200", [scoped(2.0, "class", "cuda")], ZEN3)
    got = BaselineStore(tmp_path).get("cuda-nvidia-h200", scoped(0, "class", "cuda").test_id, "ppl", "class")
    assert compare(scoped(2.01, "class", "cuda"), got, ZEN2).status == "pass"


def test_an_any_figure_measured_on_cpu_is_checked_on_cuda(tmp_path):
    BaselineStore(tmp_path).update(CLASS, [scoped(2.0, "any", "cpu")], ENV)
    got = BaselineStore(tmp_path).get("cuda-nvidia-h200", scoped(2.0, "any", "cuda").test_id, "ppl", "any")
    assert (got.value, got.level, got.recorded_on) == (2.0, "any", CLASS)


def test_a_narrower_baseline_shadows_a_wider_one(tmp_path):
    store = BaselineStore(tmp_path)
    store.update(CLASS, [scoped(2.0, "any")], ENV)
    store.update(CLASS, [scoped(3.0, "class")], ENV)
    got = BaselineStore(tmp_path).get(CLASS, scoped(0, "any").test_id, "ppl", "any")
    assert (got.value, got.level) == (3.0, "class")


def test_a_metric_refuses_an_unknown_scope():
    with pytest.raises(ValueError, match="scope='machine'"):
        scoped(1.0, "machine")


# ---- bad files

V2 = '{"schema": "scalellm.baselines/2", "applies_to": "cpu-x86_64", "level": "class", '


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"schema": "other/9", "applies_to": "cpu-x86_64", "environments": {}, "metrics": {}}', "schema is 'other/9'"),
    ('{"schema": "scalellm.baselines/1", "device_class": "cpu-x86_64", "environments": {}, "metrics": {}}',
     "python scripts/migrate_baselines.py"),
    ('{"schema": "scalellm.baselines/2", "applies_to": "cuda", "level": "kind", "environments": {}, "metrics": {}}',
     "applies to kind 'cuda' but is filed under 'cpu-x86_64'"),
    (V2 + '"environments": {}, "metrics": {"t": {"m": {"value": 1, "unit": "1", "better": "lower", '
     '"environment": "gone", "recorded_on": "cpu-x86_64"}}}}', "names environment 'gone'"),
    (V2 + '"environments": {"e": {}}, "metrics": {"t": {"m": {"value": "high", "unit": "1", "better": "lower", '
     '"environment": "e", "recorded_on": "cpu-x86_64"}}}}', "non-numeric value"),
    (V2 + '"environments": {"e": {}}, "metrics": {"t": {"m": {"value": 1, "unit": "1", "better": "lower", '
     '"environment": "e"}}}}', "lacks recorded_on"),
])
def test_a_bad_file_is_named_with_its_problem(tmp_path, content, problem):
    path = tmp_path / "cpu-x86_64" / "quality.test_demo.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(BaselineError) as excinfo:
        BaselineStore(tmp_path).validate_all()
    assert str(excinfo.value).startswith(str(path)) and problem in str(excinfo.value)


def test_a_folder_that_names_no_device_is_refused(tmp_path):
    (tmp_path / "gpu-x").mkdir()
    (tmp_path / "gpu-x" / "quality.test_demo.json").write_text("{}")
    with pytest.raises(BaselineError, match="neither 'any', a device kind"):
        BaselineStore(tmp_path).validate_all()


def test_update_refuses_to_overwrite_a_bad_file(tmp_path):
    path = tmp_path / CLASS / "quality.test_demo.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(BaselineError):
        BaselineStore(tmp_path).update(CLASS, [metric(1.0)], ENV)
    assert path.read_text() == "{not json"
