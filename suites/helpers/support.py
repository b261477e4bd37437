"""The ``unsupported`` verdict: a library release older than its first kernels for a device, or older
than the minimum another library of the stack declares for it.

Run against such a release (``scalellm.packages.FIRST_WITH_KERNELS``: bitsandbytes before 0.46.0 has no
CPU kernels), a suite fails by the dozen and says nothing about the release. So, while such a release
is installed, a failed test on that device counts as ``unsupported`` (a skip whose reason starts with
``unsupported:`` and names the release, the first with kernels and the error) when it used the
library: the exception passed through the library's code, or names the library (transformers:
"requires bitsandbytes>=0.46.1"), or the test carries one of the library's method markers (a layer
that did not quantize on ``.to('cpu')`` raises nothing). The summary counts these apart. With a
release that has the kernels nothing changes: a failure is a failure, so a bug is still told from
its fix (``scripts/regressions.toml``). Likewise on every device while the stack holds a package below
a minimum another library declares for it (``scalellm.packages.DECLARED_MINIMUMS``: transformers'
``BITSANDBYTES_MIN_VERSION``): one line before the run names the pair, and a failure that used that
package is ``unsupported`` with the library's message.
"""

from __future__ import annotations

import os

from scalellm import packages

PREFIX = "unsupported: "


def device_of(item) -> str:
    """The device a test runs on: its ``device`` parameter; host-only tests run on the cpu."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("device", "cpu") if callspec is not None else "cpu"


def raised_inside(excinfo, name: str) -> bool:
    """Whether the exception passed through a frame of package ``name`` (its own code raised it)."""
    folder = f"{os.sep}{name}{os.sep}"
    return any(folder in str(entry.path) for entry in excinfo.traceback)


def used(item, excinfo, name: str, markers: tuple[str, ...]) -> bool:
    """Whether the failure came from package ``name`` (see the module docstring)."""
    return (raised_inside(excinfo, name) or name in str(excinfo.value)
            or any(item.get_closest_marker(m) for m in markers))


def unmet_reason(item, excinfo) -> str | None:
    """``'unsupported: transformers 5.24.0 requires bitsandbytes >= 0.46.1; 0.45.4 is installed; it raised
    ...'`` for a failure that used a package the stack holds below a minimum another library declares
    (``scalellm.packages.DECLARED_MINIMUMS``), on any device; else None."""
    for required, why in packages.unmet_minimums():
        if used(item, excinfo, required, ()):
            text = str(excinfo.value).strip()
            return f"{PREFIX}{why}; it raised {excinfo.typename}: {text.splitlines()[0][:200] if text else ''}"
    return None


def unsupported_reason(item, excinfo) -> str | None:
    """``'unsupported: bitsandbytes 0.45.4 predates its cpu kernels (first in 0.46.0); it raised ...'``
    for a failure that counts as unsupported, else None."""
    device = device_of(item)
    for (name, kind), (_, markers, _) in packages.FIRST_WITH_KERNELS.items():
        why = packages.predates_kernels(name, device) if kind == device else None
        if why and used(item, excinfo, name, markers):
            text = str(excinfo.value).strip()
            return f"{PREFIX}{why}; it raised {excinfo.typename}: {text.splitlines()[0][:200] if text else ''}"
    return unmet_reason(item, excinfo)


def mark_unsupported(item, call, report) -> None:
    """Turn ``report`` (a failed setup or call) into an ``unsupported`` skip when the rule above says so."""
    if not report.failed or call.excinfo is None or call.when not in ("setup", "call"):
        return
    reason = unsupported_reason(item, call.excinfo)
    if reason:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), (item.location[1] or 0) + 1, reason)


def header_lines() -> list[str]:
    """One line per installed release that predates its kernels for some device, for the run's header."""
    lines = []
    for name, device in packages.FIRST_WITH_KERNELS:
        why = packages.predates_kernels(name, device)
        if why:
            lines.append(f"stack: {why}: {device} tests that fail using {name} are reported unsupported")
    for required, why in packages.unmet_minimums():
        lines.append(f"stack: {why}: tests that fail using {required} are reported unsupported")
    return lines
