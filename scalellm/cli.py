"""The ``scalellm`` command: ``env``, ``check`` (and, as their issues land, ``plan`` and ``report``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from scalellm import devices, environment, packages, report, results

REPO = Path(__file__).resolve().parent.parent


def cmd_env(args) -> int:
    """Print the environment fingerprint, the device classes, and which tiers can run here."""
    facts = environment.fingerprint()
    if args.json:
        print(json.dumps(facts, indent=1, sort_keys=True))
        return 0
    print("scalellm environment")
    print(report.text_table(["key", "value"], [[k, str(v)] for k, v in facts.items()]))
    print("\ndevices")
    rows = []
    for device in devices.DEVICES:
        avail = devices.availability(device)
        cls = devices.device_class(device) if avail.available else "—"
        rows.append([device, "yes" if avail.available else "no", cls, avail.reason])
    multi = devices.multigpu_availability()
    rows.append(["multigpu", "yes" if multi.available else "no", "—", multi.reason])
    print(report.text_table(["device", "present", "device class (baselines/…)", "why not"], rows))
    print("\ntiers")
    rows = []
    for tier in packages.TIERS:
        missing = packages.missing_for(tier)
        rows.append([tier, "ready" if not missing else "missing " + ", ".join(missing),
                     "; ".join(packages.hint(m) for m in missing)])
    print(report.text_table(["tier", "status", "install"], rows))
    return 0


def _suites_root() -> Path:
    if not (REPO / "suites").is_dir() or not (REPO / "conftest.py").is_file():
        raise SystemExit(f"scalellm check runs the suites of a source checkout; none found at {REPO} "
                         "(install with `pip install -e .` from a clone)")
    return REPO


def cmd_check(args, extra: list[str]) -> int:
    """Run the suites for one device and write ``reports/<timestamp>/``."""
    root = _suites_root()
    device = devices.default_device() if args.device == "auto" else args.device
    expr = device if not args.m else f"{device} and ({args.m})"
    out = Path(args.reports).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", expr, "-ra", "--report-dir", str(out),
           "--junitxml", str(out / "junit.xml"), "-o", "junit_family=xunit2"]
    if args.device != "auto" and device != "cpu":
        cmd.append("--require-device")  # asked for a GPU by name: its absence is a fault
    if args.update_baselines:
        cmd.append("--update-baselines")
    cmd += extra
    print(f"scalellm check: device {device} ({devices.device_class(device)}), -m {expr!r}", flush=True)
    print(f"scalellm check: running {' '.join(cmd[1:])}", flush=True)
    code = subprocess.call(cmd, cwd=root, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    try:
        run = results.read(out)
    except ValueError as exc:
        print(f"scalellm check: pytest exited {code} without results ({exc})", file=sys.stderr)
        return code or 1
    print("\n" + report.terminal_summary(run))
    print(f"\nreport: {out}/summary.md  results: {out}/results.json  junit: {out}/junit.xml")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalellm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="environment fingerprint, device classes, tiers that can run here")
    env.add_argument("--json", action="store_true", help="print the fingerprint as JSON")
    check = sub.add_parser("check", help="run the conformance suites for this machine's device, write a report",
                           epilog="Arguments after -- go to pytest unchanged.")
    check.add_argument("--device", choices=("auto",) + devices.DEVICES, default="auto")
    check.add_argument("-m", metavar="EXPR", help="further marker expression, e.g. 'nf4 and reference'")
    check.add_argument("--reports", default="reports", metavar="DIR", help="where run folders go (default reports/)")
    check.add_argument("--update-baselines", action="store_true", help="store figures of passing tests as baselines")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if args.command == "env":
        return cmd_env(args)
    return cmd_check(args, extra)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
