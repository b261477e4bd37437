"""The pytest side of the baseline store: collects figures, fails tests on regressions, writes results.

Figures travel from the test (possibly in a pytest-xdist worker) to the controlling process in the
test report's ``user_properties``; only the controlling process writes baselines and results, at
the end of a run that was not interrupted.

**Orphaned baselines.** A stored entry whose test was renamed or removed is checked by nothing and
would sit in the store for good. At the end of a run the recorder lists, for every suite module
collected in this run, the entries of its baseline files (in every folder: ``any``, kinds, classes)
whose test key names no test collected from it, in a terminal section ``scalellm orphaned
baselines`` (just above pytest's short summary) and in ``results.json`` (``orphaned``). "Collected"
is before deselection (``-m``, ``-k``, ``--deselect``): ``pytest -m cpu`` collects the cuda cases and
deselects them, so their entries are not orphans. A module named with ``::`` on the command line, or one with a
collection error, is collected only in part and is left out. It warns, never fails the run. Under
pytest-xdist the workers collect; one of them sends what it collected to the controller
(``workeroutput``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scalellm import devices, environment, report, results
from scalellm.baselines import LEVELS, BaselineStore, Metric, Orphan, compare, file_stem, lookup_order, test_key
from suites.helpers import scopes, support

PROPERTY = "scalellm_metric"
_FAILED = pytest.StashKey[list]()
#: The key of a pytest-xdist worker's ``workeroutput`` that carries what it collected: {file stem: [test keys]}.
COLLECTED_OUTPUT = "scalellm_collected"
#: The terminal section that lists orphaned baselines.
ORPHANS_SECTION = "scalellm orphaned baselines"


class MetricRecorder:
    def __init__(self, store: BaselineStore, *, update: bool, report_dir: str | None,
                 update_levels: tuple[str, ...] = LEVELS):
        self.store = store
        self.update = update
        self.update_levels = update_levels  # with update: the scopes whose figures are written
        self.report_dir = Path(report_dir) if report_dir else None
        self.tests: dict[str, dict] = {}
        self.metrics: list[dict] = []
        self.written: list[Path] = []
        self._classes: dict[str, str] = {}
        self._seen: dict[str, tuple[str, str]] = {}  # node id -> (file stem, test key), selected or not
        self._broken: set[str] = set()  # file stems of modules with a collection error
        self.collected: dict[str, set[str]] | None = None  # {file stem: test keys}, once collection finished
        self.orphans: list[dict] = []  # Orphan.to_json() of each, the file relative to the rootdir
        self.forgotten: list[dict] = []  # orphans removed by --update-baselines on a passing run

    # ---- inside the test process

    def device_class(self, device: str) -> str:
        if device not in self._classes:
            self._classes[device] = devices.device_class(device)
        return self._classes[device]

    def record(self, item, device: str, metric: Metric) -> None:
        device_class = self.device_class(device)
        rule = scopes.rule_for(metric.test_id, metric.name)
        metric = dataclasses.replace(metric, scope=rule.scope)
        baseline = self.store.get(device_class, metric.test_id, metric.name, rule.scope)
        verdict = compare(metric, baseline, environment.fingerprint(), lookup_order(device_class, rule.scope))
        entry = {
            "device": device, "device_class": device_class, **metric.to_json(), "scope_why": rule.why,
            "status": verdict.status, "message": verdict.message,
            "baseline": baseline.value if baseline else None,
            "level": baseline.level if baseline else None,
            "baseline_applies_to": baseline.applies_to if baseline else None,
            "baseline_recorded_on": baseline.recorded_on if baseline else None,
            "baseline_environment": baseline.environment if baseline else None,
        }
        item.user_properties.append((PROPERTY, entry))
        if verdict.status == "fail" and not (self.update and metric.scope in self.update_levels):
            item.stash.setdefault(_FAILED, []).append(f"{verdict.message}\n  scope {rule.scope}: {rule.why}")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        outcome = yield
        failed = item.stash.get(_FAILED, [])
        if failed:
            raise AssertionError("figure outside its baseline tolerance:\n" + "\n".join(failed))
        return outcome

    # ---- collection (in a worker under pytest-xdist): which tests exist, for the orphan report

    def _note(self, items) -> None:
        for item in items:
            if item.nodeid not in self._seen:
                self._seen[item.nodeid] = (file_stem(item.nodeid), test_key(item.nodeid, support.device_of(item)))

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items):
        self._note(items)  # before -m / -k deselect any

    def pytest_deselected(self, items):
        self._note(items)  # in case a plugin deselected before the hook above ran

    def pytest_collectreport(self, report):
        if report.failed:
            self._broken.add(file_stem(report.nodeid))

    def pytest_collection_finish(self, session):
        left_out = self._broken | _named_in_part(session.config)
        collected: dict[str, set[str]] = {}
        for stem, key in self._seen.values():
            if stem not in left_out:
                collected.setdefault(stem, set()).add(key)
        self.collected = collected
        output = getattr(session.config, "workeroutput", None)
        if output is not None:
            output[COLLECTED_OUTPUT] = {stem: sorted(keys) for stem, keys in collected.items()}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        """pytest-xdist, in the controller: a worker finished; take what it collected."""
        sent = (getattr(node, "workeroutput", None) or {}).get(COLLECTED_OUTPUT)
        if sent is not None:
            self.collected = self.collected or {}
            for stem, keys in sent.items():
                self.collected.setdefault(stem, set()).update(keys)

    # ---- in the controlling process

    def pytest_runtest_logreport(self, report):
        test = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed",
                                                     "duration_s": 0.0, "reason": ""})
        test["duration_s"] += report.duration
        if report.when == "call":
            test["markers"] = sorted(set(report.keywords) & set(results.MARKERS))
            self.metrics += [value for key, value in report.user_properties if key == PROPERTY]
        outcome = _outcome(report)
        if outcome is not None and test["outcome"] == "passed":
            test["outcome"], test["reason"] = outcome

    def pytest_sessionfinish(self, session, exitstatus):
        if hasattr(session.config, "workerinput"):
            return
        interrupted = exitstatus == pytest.ExitCode.INTERRUPTED or bool(session.shouldstop or session.shouldfail)
        if self.update:
            self.written = [] if interrupted else self._store_passing()
        if self.collected is not None:
            found = self.store.orphans(self.collected)
            if self.update and not interrupted and exitstatus == pytest.ExitCode.OK and found:
                # --update-baselines on a passing run: the entries of tests that no longer exist go
                self.written = sorted(set(self.written) | set(self.store.forget(found)))
                self.forgotten = [_shown(orphan, session.config.rootpath) for orphan in found]
                found = self.store.orphans(self.collected)
            self.orphans = [_shown(orphan, session.config.rootpath) for orphan in found]
        if self.report_dir is not None:
            run = results.Run(tests=list(self.tests.values()), metrics=self.metrics,
                              environment=environment.fingerprint(), updated=[str(p) for p in self.written],
                              interrupted=interrupted, orphaned=self.orphans)
            results.write(self.report_dir, run)
            report.write_summary(self.report_dir, run)

    def _store_passing(self) -> list[Path]:
        passed = {nodeid for nodeid, t in self.tests.items() if t["outcome"] == "passed"}
        by_class: dict[str, list[Metric]] = {}
        for entry in self.metrics:
            if entry["test_id"] in passed and entry["scope"] in self.update_levels:
                by_class.setdefault(entry["device_class"], []).append(Metric.from_json(entry))
                entry["status"] = "updated"
        env = environment.fingerprint()
        return [path for dc, group in sorted(by_class.items()) for path in self.store.update(dc, group, env)]

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        unsupported = [t for t in self.tests.values() if t["outcome"] == "unsupported"]
        if unsupported:
            tr.section("scalellm unsupported")
            tr.write_line(f"{len(unsupported)} test(s) unsupported, not failed: "
                          f"{unsupported[0]['reason'].split(';')[0].removeprefix(support.PREFIX)}")
        if self.metrics or self.update:
            self._metrics_summary(tr)
        if self.orphans:  # last, just above pytest's short summary and final line
            tr.section(ORPHANS_SECTION, yellow=True, bold=True)
            for line in report.orphan_lines(self.orphans):
                tr.write_line(line, yellow=True, bold=line.startswith("WARNING"))

    def _metrics_summary(self, tr) -> None:
        tr.section("scalellm metrics")
        for entry in self.metrics:
            if entry["status"] == "new":
                tr.write_line(f"NEW  {entry['message']}")
        tr.write_line(report.figure_counts_line(self.metrics))
        hint = report.record_hint(self.metrics)
        if hint:
            tr.write_line(hint)
        if self.update:
            for orphan in self.forgotten:
                tr.write_line(f"baseline removed (its test no longer exists): {orphan['file']}: {orphan['test']} "
                              f"({', '.join(orphan['metrics'])})")
            if self.written:
                tr.write_line(f"baselines updated: {len(self.written)} file(s) under {self.store.root}")
            else:
                tr.write_line("baselines NOT updated (interrupted run, or no passing test recorded a figure)")
        if self.report_dir is not None:
            tr.write_line(f"report written to {self.report_dir}")


def _named_in_part(config: pytest.Config) -> set[str]:
    """File stems of the modules that the command line names with ``::`` (a test, a class): only part
    of each is collected, so none of their entries can be called orphaned."""
    stems = set()
    for arg in config.args:
        if "::" not in arg:
            continue
        path = (config.invocation_params.dir / arg.split("::", 1)[0]).resolve()
        try:
            stems.add(file_stem(path.relative_to(config.rootpath.resolve()).as_posix()))
        except ValueError:  # a module outside the rootdir has no baseline file
            continue
    return stems


def _shown(orphan: Orphan, root: Path) -> dict:
    data, root = orphan.to_json(), root.resolve()
    path = Path(data["file"]).resolve()
    data["file"] = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return data


def _outcome(report) -> tuple[str, str] | None:
    """(outcome, reason) that this phase's report imposes on the test, or None."""
    if hasattr(report, "wasxfail"):
        return ("xfailed", report.wasxfail) if report.skipped else ("xpassed", report.wasxfail)
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        return ("unsupported" if reason.startswith(support.PREFIX) else "skipped"), reason
    if report.failed:
        # "???": xdist's report of a test whose worker died (suites/helpers/crashes.py): the test failed
        return ("failed" if report.when in ("call", "???") else "error"), report.longreprtext.splitlines()[-1][:500] \
            if report.longreprtext else ""
    return None

