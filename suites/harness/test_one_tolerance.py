"""One tolerance per figure: the test's. The baseline store keeps no copy (issue #15, item 2).

The test passes ``tolerance=Tolerance(...)`` to ``record_metric`` and the comparison uses that one;
a copy in the baseline files decided nothing and drifted from the code. The store writes none, reads
an entry that still has one as if it had none, and the committed store holds none
(``scripts/drop_stored_tolerances.py`` removed them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from scalellm import baselines
from scalellm.baselines import BaselineStore, Metric, Tolerance

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "baselines"
ENV = {"python": "3.11.7", "torch": "2.13.0"}
#: What a stored entry holds: no tolerance among them.
RECORD_KEYS = {"value", "unit", "better", "samples", "environment", "recorded_on"}

METRIC_TEST = """
import os
from scalellm.baselines import Tolerance

def test_figure(record_metric):
    record_metric("error", float(os.environ["VALUE"]), unit="1", better="lower",
                  tolerance=Tolerance(rel=0.05, why="self-test"))
"""


def stored_tolerances(store: Path) -> list[str]:
    """'file: test key, metric' of every entry of ``store`` that holds a tolerance."""
    found = []
    for path in sorted(store.glob("*/*.json")):
        for key, by_name in json.loads(path.read_text())["metrics"].items():
            found += [f"{path.relative_to(store.parent)}: {key}, {name}"
                      for name, record in by_name.items() if "tolerance" in record]
    return found


def test_the_committed_store_holds_no_tolerance():
    found = stored_tolerances(STORE)
    assert not found, (f"{len(found)} baseline entries hold a stored tolerance; a figure's tolerance lives in its "
                       "test only (run `python scripts/drop_stored_tolerances.py baselines`):\n" + "\n".join(found))


def with_stored_tolerance(path: Path, tolerance: dict) -> None:
    """Give every entry of the baseline file ``path`` a stored tolerance, as the store wrote before."""
    data = json.loads(path.read_text())
    for by_name in data["metrics"].values():
        for record in by_name.values():
            record["tolerance"] = tolerance
    path.write_text(baselines._dump(data))


def demo_store(root: Path, device_class: str = "cpu-intel-xeon-amx-2c") -> Path:
    [path] = BaselineStore(root).update(device_class, [
        Metric("suites/test_demo.py::test_figure", "error", 1.0, "1", "lower", Tolerance(rel=0.05, why="demo")),
        Metric("suites/test_demo.py::test_figure", "speed", 2.0, "tok/s", "higher", Tolerance(rel=0.1, why="demo"),
               (1.9, 2.0, 2.1))], ENV)
    return path


def test_the_scan_sees_a_stored_tolerance(tmp_path):
    with_stored_tolerance(demo_store(tmp_path / "store"), {"rel": 0.02, "abs": 0.0, "why": "old copy"})
    assert stored_tolerances(tmp_path / "store") == ["store/cpu-intel-xeon-amx-2c/test_demo.json: test_figure, error",
                                                     "store/cpu-intel-xeon-amx-2c/test_demo.json: test_figure, speed"]


def test_the_store_writes_no_tolerance(tmp_path):
    data = json.loads(demo_store(tmp_path).read_text())
    assert {name: set(record) for name, record in data["metrics"]["test_figure"].items()} == \
        {"error": RECORD_KEYS, "speed": RECORD_KEYS}


def test_writing_a_file_drops_the_tolerance_its_older_entries_stored(tmp_path):
    path = demo_store(tmp_path)
    with_stored_tolerance(path, {"rel": 0.02, "abs": 0.0, "why": "old copy"})
    BaselineStore(tmp_path).update("cpu-intel-xeon-amx-2c", [
        Metric("suites/test_demo.py::test_other", "error", 3.0, "1", "lower", Tolerance(rel=0.05))], ENV)
    assert stored_tolerances(tmp_path) == []


def test_a_stored_tolerance_is_read_as_if_absent(suite, monkeypatch):
    """A stored copy far wider than the test's lets nothing through: the test's 5% decides."""
    suite.write("test_demo.py", METRIC_TEST)
    monkeypatch.setenv("VALUE", "1.0")
    suite.run("--update-baselines").assert_outcomes(passed=1)
    [path] = suite.baselines.glob("*/test_demo.json")
    with_stored_tolerance(path, {"rel": 10.0, "abs": 0.0, "why": "a stale, much wider copy"})
    monkeypatch.setenv("VALUE", "1.2")
    result = suite.run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*'error'*measured 1.2 1, baseline 1 1, tolerance rel 0.05 (self-test)*"])
    result.stdout.no_fnmatch_line("*stale*")


def test_update_baselines_writes_no_tolerance(suite, monkeypatch):
    suite.write("test_demo.py", METRIC_TEST)
    monkeypatch.setenv("VALUE", "1.0")
    suite.run("--update-baselines").assert_outcomes(passed=1)
    [data] = suite.baseline_files().values()
    assert set(data["metrics"]["test_figure"]["error"]) == RECORD_KEYS


def drop(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "drop_stored_tolerances.py"), str(store), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_the_migration_removes_only_the_tolerances(tmp_path):
    store = tmp_path / "store"
    path = demo_store(store)
    clean = path.read_text()
    with_stored_tolerance(path, {"rel": 0.02, "abs": 0.0, "why": "old copy"})
    assert drop(store, "--dry-run").stdout.strip().endswith("would remove 2 stored tolerance(s) from 1 file(s)")
    assert "tolerance" in path.read_text()
    done = drop(store)
    assert done.returncode == 0, done.stderr
    assert path.read_text() == clean  # byte for byte what the store itself writes: no other change
    assert drop(store).stdout.strip().endswith("removed 0 stored tolerance(s) from 0 file(s)")
