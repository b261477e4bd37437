"""Fixtures every suite may use."""

from __future__ import annotations

import pytest

from suites.helpers.bnb_codec import BnbCodec, load
from suites.helpers.isolation import Worker
from suites.helpers.packages import need


@pytest.fixture(scope="session")
def bnb() -> BnbCodec:
    """bitsandbytes' 4-bit codec behind a numpy adapter (skips with the install hint when it is missing)."""
    need("bitsandbytes")
    return BnbCodec(load())


@pytest.fixture(scope="module")
def isolated():
    """A :class:`~suites.helpers.isolation.Worker` for this module: its cases run in one child process
    that has seen no other test, so nothing an earlier test left alive counts into their peaks. The
    child starts at the first ``isolated.run`` and ends with the module."""
    worker = Worker()
    yield worker
    worker.close()
