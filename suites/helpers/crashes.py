"""A library that crashes the process fails the test it crashed in, names how, and the run goes on.

A segfault or an abort in native code (a bnb kernel, ggml, a CUDA driver) kills the Python process
that runs it: in a plain pytest run that is the whole session, with no ``results.json``, no JUnit
and no report. The mechanism is pytest-xdist's (``-n 1``, which ``scalellm check`` passes): the
tests run in one worker process; when it dies, xdist reports the test it was running as failed
("worker 'gw0' crashed while running ..."), starts a fresh worker and goes on with the next test,
and the controlling process, which runs no test, writes the results and reports as usual.

What xdist does not say is *how* the worker died. Each worker's ``faulthandler`` writes to a file of
its own (``<SCALELLM_CRASH_DIR>/<worker id>.log``; pytest's own faulthandler writes to the worker's
stderr, which nobody reads), and the controller puts that file -- ``Fatal Python error:
Segmentation fault`` / ``Aborted`` and the Python stack of the crash -- into the crashed test's
report, its last line naming the signal.

Cost: a worker costs one interpreter start and the collection once more (seconds); a crash costs
a new worker, whose session fixtures (loaded models) are rebuilt as they are needed.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import tempfile
from pathlib import Path

import pytest

CRASH_DIR_ENV = "SCALELLM_CRASH_DIR"


class CrashReports:
    """Registered by the root conftest when pytest-xdist is active (see the module docstring)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self._file = None

    @staticmethod
    def folder() -> Path:
        """The folder shared by the controller and its workers (set by the controller, inherited)."""
        if CRASH_DIR_ENV not in os.environ:
            os.environ[CRASH_DIR_ENV] = tempfile.mkdtemp(prefix="scalellm-crashes-")
        return Path(os.environ[CRASH_DIR_ENV])

    def pytest_sessionstart(self, session):
        """In a worker: point faulthandler at this worker's file (at session start, after pytest's own
        faulthandler plugin pointed it at stderr during configure)."""
        worker = getattr(session.config, "workerinput", {}).get("workerid")
        if worker is not None:
            self._file = open(self.folder() / f"{worker}.log", "w")  # noqa: SIM115 - open while the worker lives
            faulthandler.enable(file=self._file, all_threads=False)

    def pytest_unconfigure(self, config):
        if getattr(config, "workerinput", None) is None:  # the controller: the workers are gone
            shutil.rmtree(self.folder(), ignore_errors=True)

    def pytest_handlecrashitem(self, crashitem, report, sched):
        """xdist's report of a test whose worker died: add how it died (its faulthandler file)."""
        worker = report.node.gateway.id if getattr(report, "node", None) is not None else "?"
        log = self.folder() / f"{worker}.log"
        fault = log.read_text(errors="replace").strip() if log.is_file() else ""
        how = next((line for line in fault.splitlines() if line.startswith("Fatal Python error")),
                   "no fault recorded (killed from outside: the out-of-memory killer, a kill -9?)")
        report.longrepr = (f"{report.longrepr}\n{fault}\n"
                           f"crashed: {how.removeprefix('Fatal Python error: ')} in worker {worker} "
                           f"while running {crashitem}; the run went on in a fresh worker")


def register(config: pytest.Config) -> None:
    """Register :class:`CrashReports` where xdist runs this session (controller and workers)."""
    if config.pluginmanager.hasplugin("xdist") and (
            getattr(config, "workerinput", None) is not None or getattr(config.option, "numprocesses", None)):
        CrashReports.folder()  # in the controller: before the workers start, so they inherit it
        config.pluginmanager.register(CrashReports(config), "scalellm-crashes")
