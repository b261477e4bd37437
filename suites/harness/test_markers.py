"""One list of markers: what pyproject.toml registers is what results.json records and the README lists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from scalellm import devices, results

ROOT = Path(__file__).resolve().parents[2]
#: Registered for selection, not recorded with a result: restricts the device parametrization.
SELECTION_MARKERS = {"devices"}


def registered_markers() -> set[str]:
    lines = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    return {re.match(r"\w+", line).group() for line in lines}


def test_recorded_markers_are_the_registered_ones():
    registered = registered_markers() - SELECTION_MARKERS
    assert set(results.MARKERS) == registered, (
        f"scalellm/results.py MARKERS lacks {sorted(registered - set(results.MARKERS))} and has "
        f"{sorted(set(results.MARKERS) - registered)} that pyproject.toml does not register")


def test_every_device_has_its_marker():
    assert set(devices.DEVICES) <= set(results.DEVICE_MARKERS)


def test_the_readme_lists_every_registered_marker():
    readme = (ROOT / "README.md").read_text().split("## Markers", 1)[1].split("\n## ", 1)[0]
    missing = sorted(m for m in registered_markers() if f"`{m}" not in readme)
    assert not missing, f"README.md '## Markers' does not list {missing}"
