"""Remove the stored copy of each figure's tolerance from a baseline store (issue #15, item 2).

A figure's tolerance is written once, in the test that records it (``record_metric(...,
tolerance=Tolerance(rel=..., abs=..., why=...))``), and :func:`scalellm.baselines.compare` uses
that one only. ``--update-baselines`` used to write a copy of it into every baseline entry; nothing
read the copy, and the copies drifted from the code (39 of 554 disagreed when this script was
written), so a reader of ``baselines/`` saw numbers that decided nothing. The store no longer
writes one, reads an entry that still has one as if it had none, and the harness
(``suites/harness/test_one_tolerance.py``) fails when a committed file holds one again.

This script removes the ``"tolerance"`` key of every entry and changes nothing else: no value,
sample, unit, direction, environment or ``recorded_on`` moves. Each file is read and validated as
the store reads it (:func:`scalellm.baselines.read_file`) and written as the store writes it
(:func:`scalellm.baselines._dump`, :func:`scalellm.baselines.write_atomic`), so a later
``--update-baselines`` shows no difference of formatting. A file without stored tolerances is
left untouched (not even rewritten).

Usage (from the repository root): ``python scripts/drop_stored_tolerances.py baselines``
(``--dry-run`` only counts). Running it twice is harmless: the second run finds nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalellm import baselines  # noqa: E402


def drop(store: Path, dry_run: bool = False) -> dict[Path, int]:
    """{file: entries whose tolerance went} for every file of ``store`` that held one."""
    changed = {}
    for path in baselines.BaselineStore(store).validate_all():
        data = baselines.read_file(path, path.parent.name)
        dropped = baselines.drop_stored_tolerances(data)
        if not dropped:
            continue
        changed[path] = len(dropped)
        if not dry_run:
            baselines.write_atomic(path, baselines._dump(data))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="the baseline store (e.g. baselines)")
    parser.add_argument("--dry-run", action="store_true", help="count, write nothing")
    args = parser.parse_args(argv)
    changed = drop(args.store, args.dry_run)
    for path, n in sorted(changed.items()):
        print(f"  {path}: {n} stored tolerance(s)")
    verb = "would remove" if args.dry_run else "removed"
    print(f"{args.store}: {verb} {sum(changed.values())} stored tolerance(s) from {len(changed)} file(s)")
    if not args.dry_run:
        baselines.BaselineStore(args.store).validate_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
