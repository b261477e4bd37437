"""Convert a baseline store from schema 1 (one folder per device class) to schema 2 (scoped folders).

Schema 1 filed every figure under the device class that measured it (``cpu-x86_64/``,
``cuda-nvidia-h100-80gb-hbm3/``), so a figure was only ever compared on that class. Schema 2 files
each figure where its scope says it applies (``scalellm.baselines``; the scopes are chosen by
``suites/helpers/scopes.py``): ``any/``, a kind (``cpu/``, ``cuda/``) or a class. This script moves
every record there unchanged (value, unit, direction, samples, environment), adds the class that
measured it (``recorded_on``) and strips the device from its key. No value is computed or typed: it
only moves records. A schema-1 record's stored tolerance is used only to check the agreement below,
then left out: schema 2 keeps no copy of a figure's tolerance, which lives in its test
(``scalellm.baselines``; ``scripts/drop_stored_tolerances.py`` removed them from the committed store).

- A schema-1 cpu class (``cpu-x86_64``) named no CPU; the new class is derived from each record's
  environment (CPU model and flags) and ``--cpu-cores`` (schema 1 did not record cores).
- Where two classes give one ``kind``/``any`` key (a cpu and a cuda record of an ``any`` figure), the
  two must agree within the record's tolerance, or the script stops naming both; the record of the
  class listed first in ``--prefer`` is kept (default: cpu classes first, which every CI run checks).

Usage (from the repository root): ``python scripts/migrate_baselines.py baselines [--cpu-cores 2]``.
It writes the new folders, then removes the schema-1 folders it converted; ``--dry-run`` only prints.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scalellm import baselines, devices  # noqa: E402
from suites.helpers import scopes  # noqa: E402


def test_id(stem: str, key: str) -> str:
    """The node id a schema-1 record came from: ('model.test_quality', 't[cpu]') -> 'suites/model/test_quality.py::t[cpu]'."""
    return "suites/" + stem.replace(".", "/") + ".py::" + key


def new_class(old_class: str, env: dict, cpu_cores: int) -> str:
    if not old_class.startswith("cpu-"):
        return old_class
    flags = [f for f in (env.get("cpu_flags") or "").split(",") if f]
    return devices.cpu_class(env.get("cpu") or "", flags, cpu_cores, machine=old_class.removeprefix("cpu-"))


def records(store: Path, cpu_cores: int):
    """(old folder, file stem, test id, metric name, record, environment, new class) of every schema-1 record."""
    for path in sorted(store.glob("*/*.json")):
        data = json.loads(path.read_text())
        if data.get("schema") != baselines.SCHEMA_V1:
            continue
        old_class = data["device_class"]
        for key, by_name in sorted(data["metrics"].items()):
            for name, record in sorted(by_name.items()):
                env = data["environments"][record["environment"]]
                yield path.parent, path.stem, test_id(path.stem, key), name, record, env, \
                    new_class(old_class, env, cpu_cores)


def _agree(a: dict, b: dict) -> bool:
    tol = baselines.Tolerance(**a.get("tolerance", {}))
    return abs(a["value"] - b["value"]) <= tol.allowed(a["value"])


def plan(store: Path, cpu_cores: int, prefer: tuple[str, ...]) -> tuple[dict, set[Path]]:
    """{(folder, stem): {key: {name: (record, env, class)}}} of the new layout, and the old folders read."""
    layout: dict[tuple[str, str], dict] = {}
    old_dirs: set[Path] = set()
    rank = lambda cls: next((i for i, p in enumerate(prefer) if cls.startswith(p)), len(prefer))  # noqa: E731
    for old_dir, stem, tid, name, record, env, cls in records(store, cpu_cores):
        old_dirs.add(old_dir)
        rule = scopes.rule_for(tid, name)
        folder = baselines.applies_to(cls, rule.scope)
        key = baselines.test_key(tid, cls.split("-", 1)[0])
        slot = layout.setdefault((folder, stem), {}).setdefault(key, {})
        if name in slot:
            other, _, other_cls = slot[name]
            if not _agree(other, record):
                raise SystemExit(f"{stem} {key} {name}: scope {rule.scope} puts {other_cls} ({other['value']}) and "
                                 f"{cls} ({record['value']}) in {folder}/, but they differ by more than the "
                                 f"tolerance: the rule in suites/helpers/scopes.py is wrong for this figure")
            print(f"  {folder}/{stem} {key} {name}: {other_cls} {other['value']:.6g} and {cls} {record['value']:.6g} "
                  f"agree; keeping {other_cls if rank(other_cls) <= rank(cls) else cls}")
            if rank(other_cls) <= rank(cls):
                continue
        slot[name] = (record, env, cls)
    return layout, old_dirs


def write(store: Path, staging: Path, layout: dict) -> list[Path]:
    """Write the new files under ``staging`` (merged with schema-2 files already in ``store``)."""
    written = []
    for (folder, stem), by_key in sorted(layout.items()):
        existing = store / folder / f"{stem}.json"
        current = existing.exists() and json.loads(existing.read_text()).get("schema") == baselines.SCHEMA
        data = baselines.read_file(existing, folder) if current else baselines._empty(folder)
        path = staging / folder / f"{stem}.json"
        for key, by_name in by_key.items():
            for name, (record, env, cls) in by_name.items():
                env_id = baselines.environment.fingerprint_id(env)
                data["environments"][env_id] = env
                data["metrics"].setdefault(key, {})[name] = {**record, "environment": env_id, "recorded_on": cls}
        baselines.drop_stored_tolerances(data)
        baselines._drop_unused_environments(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        baselines.write_atomic(path, baselines._dump(data))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", type=Path, help="the baseline store (e.g. baselines)")
    parser.add_argument("--cpu-cores", type=int, default=2,
                        help="cores of the machines that recorded the schema-1 cpu figures (default 2)")
    parser.add_argument("--prefer", default="cpu,cuda,mps",
                        help="which device's record to keep where two give one kind/any key (default cpu,cuda,mps)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    args = parser.parse_args(argv)
    layout, old_dirs = plan(args.store, args.cpu_cores, tuple(args.prefer.split(",")))
    if not old_dirs:
        print(f"{args.store}: no schema-1 files; nothing to do")
        return 0
    counts: dict[str, int] = {}
    for (folder, _), by_key in layout.items():
        level = baselines.level_of(folder)
        counts[level] = counts.get(level, 0) + sum(len(v) for v in by_key.values())
    print(f"{args.store}: {sum(counts.values())} figures from {len(old_dirs)} schema-1 folder(s) -> "
          + ", ".join(f"{lv} {counts.get(lv, 0)}" for lv in baselines.LEVELS))
    if args.dry_run:
        return 0
    staging = args.store / ".migrating"
    shutil.rmtree(staging, ignore_errors=True)
    written = write(args.store, staging, layout)
    for old in sorted(old_dirs):  # a class may keep its folder's name (cuda-...): old files go first
        shutil.rmtree(old)
    for path in written:
        target = args.store / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    shutil.rmtree(staging)
    print(f"wrote {len(written)} file(s); removed the schema-1 folders {', '.join(sorted(d.name for d in old_dirs))}")
    baselines.BaselineStore(args.store).validate_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
