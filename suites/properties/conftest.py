"""Fixtures of the property suite: bitsandbytes' codec behind a numpy adapter."""

from __future__ import annotations

import pytest

from suites.conformance.bnb_codec import BnbCodec, load
from suites.helpers.packages import need


@pytest.fixture(scope="session")
def bnb() -> BnbCodec:
    """bitsandbytes' 4-bit codec (skips with the install hint when bitsandbytes is missing)."""
    need("bitsandbytes")
    return BnbCodec(load())
