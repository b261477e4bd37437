"""Replay real past regressions: does the suite tell a library's buggy release from its fix?

The table is ``scripts/regressions.toml`` (one place; ``docs/regressions.md`` shows it with what was
measured). A **row** is one real upstream bug: the library, the last release that has it (``buggy``),
the first release that fixed it (``fixed``), the upstream issue/PR, the symptom, and the pytest node
ids of this repo's suites that should fail on ``buggy`` and pass on ``fixed``. ``hide`` names optional
packages of the stack that the older release cannot import (it imports symbols their installed
release no longer has); they are hidden from both releases of the row (``sys.modules[name] = None``
in a ``sitecustomize`` on ``PYTHONPATH``, so ``find_spec`` says absent), and ``note`` says why.

For each row both releases are installed into overlays (``pip install --no-deps --target
CACHE/<lib>-<version>``, kept between runs) and the row's tests run once per release with the overlay
first on ``PYTHONPATH`` and the rest of the pinned stack unchanged. The row is **told apart** when the
fixed release has no failure and at least one test fails (or xfails) on the buggy release and passes
on the fixed one, for a reason other than an import error. A row with no test yet is reported ``no test``.

    python scripts/replay_regressions.py --list
    python scripts/replay_regressions.py [--only ROW_ID ...] [--out replay.json] [--python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "scripts" / "regressions.toml"
DEFAULT_PYTHON = ROOT / ".tox" / "tests" / "bin" / "python"
FAILED = ("failed", "error")
IMPORT_ERRORS = ("ImportError", "ModuleNotFoundError")
#: One pytest run's wall-clock limit: the longest row here takes ~30 s on a 2-core CPU.
RUN_TIMEOUT_S = 900


class ReplayError(Exception):
    """A row that cannot be replayed: the message names the row and the problem."""


@dataclass
class Row:
    id: str
    library: str
    buggy: str
    fixed: str
    upstream: list[str]
    symptom: str
    tests: list[str] = field(default_factory=list)
    hide: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Side:
    """What one release did on the row's tests."""

    version: str
    outcomes: dict[str, str] = field(default_factory=dict)  # node id -> passed/failed/error/skipped/xfailed
    first_failure: str = ""
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return sum(o == outcome for o in self.outcomes.values())

    def summary(self) -> str:
        parts = [f"{self.count(o)} {o}" for o in ("passed", "failed", "error", "xfailed", "skipped") if self.count(o)]
        return ", ".join(parts) or "nothing ran"


def load_rows(path: Path = TABLE) -> list[Row]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    rows = [Row(**r) for r in data["row"]]
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ReplayError(f"{path}: duplicate row ids")
    return rows


def overlay(cache: Path, python: str, row: Row, version: str) -> Path:
    """The folder holding ``row.library==version`` alone, installed on first use."""
    target = cache / f"{row.library}-{version}"
    done = target / ".installed"
    if done.exists():
        return target
    cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
           "--target", str(target), f"{row.library}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ReplayError(f"row {row.id}: cannot install {row.library}=={version}: {last}")
    done.write_text(version)
    return target


def hiding(cache: Path, names: list[str]) -> Path | None:
    """A folder whose ``sitecustomize`` makes ``names`` absent (None in ``sys.modules``)."""
    if not names:
        return None
    folder = cache / ("_hide-" + "-".join(sorted(names)))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        f"# written by scripts/replay_regressions.py: {sorted(names)} are hidden for this replay\n"
        f"for _name in {sorted(names)!r}:\n    sys.modules.setdefault(_name, None)\n")
    return folder


def _outcome(case: ET.Element) -> tuple[str, str]:
    """(outcome, message) of one junit testcase."""
    for tag, name in (("failure", "failed"), ("error", "error")):
        el = case.find(tag)
        if el is not None:
            return name, el.get("message") or (el.text or "").strip()
    el = case.find("skipped")
    if el is not None:
        return ("xfailed" if el.get("type") == "pytest.xfail" else "skipped"), el.get("message") or ""
    return "passed", ""


def _node_id(case: ET.Element) -> str:
    module = case.get("classname", "")
    parts = module.split(".")
    # classname is "suites.lora.test_x" or "suites.lora.test_x.TestClass"
    for i in range(len(parts), 0, -1):
        path = Path(ROOT, *parts[:i]).with_suffix(".py")
        if path.exists():
            return "::".join(["/".join(parts[:i]) + ".py", *parts[i:], case.get("name", "")])
    return f"{module}::{case.get('name', '')}"


def run_tests(python: str, row: Row, version: str, paths: list[Path]) -> Side:
    """Run the row's tests with ``paths`` (the overlay, the hiding folder) first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH", "")])])
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *row.tests]
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - start
        _check_ids_exist(row, proc)
        if not junit.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise ReplayError(f"row {row.id}: pytest wrote no result with {row.library}=={version}: {tail}")
        side = Side(version, seconds=round(seconds, 1))
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = _outcome(case)
            side.outcomes[_node_id(case)] = outcome
            if outcome in FAILED and not side.first_failure:
                side.first_failure = (message.strip().splitlines() or [""])[0][:300]
    return side


def _check_ids_exist(row: Row, proc: subprocess.CompletedProcess) -> None:
    """pytest exits 4 and prints ``ERROR: not found: <id>`` for a node id that does not exist."""
    missing = [line.split("not found:", 1)[1].strip() for line in (proc.stdout + proc.stderr).splitlines()
               if "not found:" in line]
    if proc.returncode == 4 or missing:
        raise ReplayError(f"row {row.id}: test id(s) not found: {missing or proc.stderr.strip()[-300:]}")


def verdict(row: Row, buggy: Side | None, fixed: Side | None) -> str:
    """``told apart``, ``not told apart`` or ``no test`` (see the module docstring)."""
    if not row.tests:
        return "no test"
    if any(fixed.outcomes.get(t) in FAILED for t in fixed.outcomes):
        return "not told apart (fails on the fixed release)"
    if buggy.first_failure.startswith(IMPORT_ERRORS):
        return "not told apart (buggy release does not import)"
    return "told apart" if told_by(buggy, fixed) else "not told apart"


def told_by(buggy: Side, fixed: Side) -> list[str]:
    """The tests that fail (or xfail) on the buggy release and pass on the fixed one."""
    return [t for t, was in buggy.outcomes.items()
            if was in FAILED + ("xfailed",) and fixed.outcomes.get(t) == "passed"]


def replay(row: Row, cache: Path, python: str) -> dict:
    """One row's result as a JSON-ready dict."""
    sides = {}
    if row.tests:
        hidden = [p for p in [hiding(cache, row.hide)] if p]
        for which in ("buggy", "fixed"):
            version = getattr(row, which)
            sides[which] = run_tests(python, row, version, [overlay(cache, python, row, version), *hidden])
    result = asdict(row)
    result["verdict"] = verdict(row, sides.get("buggy"), sides.get("fixed"))
    result["told_by"] = told_by(sides["buggy"], sides["fixed"]) if result["verdict"] == "told apart" else []
    result["results"] = {k: asdict(v) | {"summary": v.summary()} for k, v in sides.items()}
    return result


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def print_table(results: list[dict]) -> None:
    print(f"{'row':44} {'release':22} {'verdict':28} buggy | fixed")
    for r in results:
        res = r["results"]
        sides = " | ".join(res[k]["summary"] for k in ("buggy", "fixed") if k in res) or "-"
        print(f"{r['id']:44} {r['library'] + ' ' + r['buggy'] + '->' + r['fixed']:22} {r['verdict']:28} {sides}")
        if r.get("error"):
            print(f"    error: {r['error']}")
        elif "buggy" in res and res["buggy"]["first_failure"]:
            print(f"    buggy: {res['buggy']['first_failure'][:160]}")
    told = sum(r["verdict"] == "told apart" for r in results)
    print(f"\n{told}/{len(results)} rows told apart")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--cache", type=Path, default=ROOT / ".replay", help="overlay folder (default .replay/)")
    ap.add_argument("--python", default=str(DEFAULT_PYTHON), help="interpreter of the stack (default the tox env's)")
    ap.add_argument("--only", action="append", metavar="ROW_ID", help="replay only this row (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    rows = load_rows(args.table)
    if args.list:
        for r in rows:
            print(f"{r.id:44} {r.library} {r.buggy} -> {r.fixed}  ({len(r.tests)} tests)  {r.symptom[:70]}")
        return 0
    if args.only:
        unknown = set(args.only) - {r.id for r in rows}
        if unknown:
            ap.error(f"unknown row id(s): {sorted(unknown)}; see --list")
        rows = [r for r in rows if r.id in args.only]
    args.cache.mkdir(parents=True, exist_ok=True)
    start, results = time.monotonic(), []
    for row in rows:
        print(f"replaying {row.id} ...", file=sys.stderr, flush=True)
        try:
            results.append(replay(row, args.cache.resolve(), args.python))
        except (ReplayError, subprocess.TimeoutExpired) as exc:
            results.append(asdict(row) | {"verdict": "error", "error": str(exc), "told_by": [], "results": {}})
    print_table(results)
    wall = round(time.monotonic() - start, 1)
    print(f"wall time {wall} s")
    if args.out:
        doc = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "python": args.python,
               "wall_s": wall, "rows": results}
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 1 if any(r["verdict"] == "error" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
