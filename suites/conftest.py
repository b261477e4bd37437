"""Fixtures every suite may use."""

from __future__ import annotations

import pytest

from suites.helpers.isolation import Worker


@pytest.fixture(scope="module")
def isolated():
    """A :class:`~suites.helpers.isolation.Worker` for this module: its cases run in one child process
    that has seen no other test, so nothing an earlier test left alive counts into their peaks. The
    child starts at the first ``isolated.run`` and ends with the module."""
    worker = Worker()
    yield worker
    worker.close()
