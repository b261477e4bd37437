"""What importing a library does to the process, measured in a child that has imported nothing else.

Run by :class:`suites.helpers.isolation.Worker` (a fresh ``spawn`` child started with the session's
starting environment), so the answer is the library's own, not that of what the tests imported before.
"""

from __future__ import annotations

import importlib
import os


def environ_changes(module: str) -> dict[str, tuple[str | None, str | None]]:
    """Import ``module`` and return every ``os.environ`` variable it set, changed or removed:
    ``{name: (before, after)}``, ``None`` for unset."""
    before = dict(os.environ)
    importlib.import_module(module)
    after = dict(os.environ)
    return {name: (before.get(name), after.get(name))
            for name in sorted(before.keys() | after.keys()) if before.get(name) != after.get(name)}
