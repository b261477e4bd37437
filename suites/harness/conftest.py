"""Run small throwaway suites through the project's own conftest.py (pytester, in a subprocess)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class SuiteRunner:
    """A scratch project with this repo's conftest.py and markers; ``run`` pytest on it."""

    def __init__(self, pytester: pytest.Pytester, monkeypatch):
        self.pytester = pytester
        pytester.makeconftest((ROOT / "conftest.py").read_text())
        pytester.makefile(".toml", pyproject=(ROOT / "pyproject.toml").read_text())
        (pytester.path / "suites" / "helpers").mkdir(parents=True)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.baselines = pytester.path / "store"

    def write(self, name: str, source: str) -> None:
        self.pytester.makepyfile(**{f"suites/{name}": source})

    def run(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess("-p", "no:cacheprovider", "--baseline-dir", str(self.baselines),
                                                  *args)

    def baseline_files(self) -> dict[str, dict]:
        return {str(p.relative_to(self.baselines)): json.loads(p.read_text())
                for p in sorted(self.baselines.glob("*/*.json"))}


@pytest.fixture
def suite(pytester, monkeypatch) -> SuiteRunner:
    return SuiteRunner(pytester, monkeypatch)
