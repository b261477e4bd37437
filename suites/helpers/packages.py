"""Import an optional package or skip with its install hint."""

from __future__ import annotations

import pytest

from scalellm import packages


def need(name: str):
    """The imported module ``name``; a skip naming the install hint when it is not installed."""
    if not packages.present(name):
        pytest.skip(f"{name} is not installed: {packages.hint(name)}")
    return pytest.importorskip(name)
