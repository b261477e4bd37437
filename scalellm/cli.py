"""The ``scalellm`` command: ``env``, ``check``, ``plan`` (memory planner) and ``report`` (nightly HTML)."""

from __future__ import annotations

import argparse
import importlib.util
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
    # The rootdir and config file pinned, paths written --opt=PATH: pytest picks its rootdir from the free
    # arguments before it knows the suite's options, so `--report-dir DIR` outside the checkout would make
    # DIR the rootdir (pytest-dev/pytest#8846; scalellm_pytest.py). Pinned, PYTEST ARGS cannot move it.
    cmd = [sys.executable, "-m", "pytest", f"--rootdir={root}", f"--config-file={root / 'pyproject.toml'}",
           "-m", expr, "-ra", f"--report-dir={out}", f"--junitxml={out / 'junit.xml'}", "-o", "junit_family=xunit2"]
    if args.device != "auto" and device != "cpu":
        cmd.append("--require-device")  # asked for a GPU by name: its absence is a fault
    if args.update_baselines:
        cmd.append("--update-baselines")
    if not args.in_process and importlib.util.find_spec("xdist") is not None:
        # one pytest-xdist worker: a crash in a library fails its test and the run goes on in a fresh
        # worker, with complete results (suites/helpers/crashes.py)
        if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
            cmd += ["-p", "xdist.plugin"]  # xdist's own advice when entry points are not loaded
        cmd += ["-n", "1"]
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


def cmd_plan(args) -> int:
    """Predict the peak memory of a model/method/task and say which cards it fits (exit 2 on bad input)."""
    from scalellm import planner

    try:
        budget = planner.parse_budget(args.budget) if args.budget is not None else None
        setting = planner.Setting(method=args.method, task=args.task, seq=args.seq, batch=args.batch,
                                  rank=args.rank, grad_checkpointing=args.grad_checkpointing,
                                  optimizer=args.optimizer)
        result = planner.plan(args.model, setting, budget)
    except planner.PlanError as exc:
        print(f"scalellm plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=1, sort_keys=True) if args.json else planner.render(result))
    return 0


def cmd_report(args) -> int:
    """Render the runs in DIR... into one self-contained HTML page."""
    from scalellm import html_report

    try:
        path = html_report.write(args.dirs, Path(args.output) if args.output else None,
                                 include_fit=not args.no_plan)
    except ValueError as exc:
        print(f"scalellm report: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


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
    check.add_argument("--in-process", action="store_true",
                       help="run the tests in this pytest process, not in a pytest-xdist worker (a crash in a "
                            "library then ends the run)")
    plan = sub.add_parser("plan", help="predict peak GPU memory of a model/method/task; fit verdict for 8-24 GiB cards")
    plan.add_argument("model", help="a shape fixture name (fixtures/shapes), a config.json, or a checkpoint directory")
    plan.add_argument("--method", default="bf16", help="fp32, bf16, fp16, int8, nf4, nf4-dq, fp4, fp4-dq, gptq4 "
                                                       "or gguf:TYPE (e.g. gguf:Q4_K)")
    plan.add_argument("--task", default="inference", help="inference, lora, qlora or full")
    plan.add_argument("--seq", type=int, default=512, help="training sequence length, or for inference the whole "
                                                          "context (prompt plus generated tokens)")
    plan.add_argument("--batch", type=int, default=1)
    plan.add_argument("--rank", type=int, default=16, help="LoRA rank (adapters on every attention and MLP linear)")
    plan.add_argument("--grad-checkpointing", action="store_true")
    plan.add_argument("--optimizer", default="adamw", help="adamw or paged_adamw_8bit")
    plan.add_argument("--budget", default=None, help="your card or memory budget, e.g. 8GiB, 7.5GB")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (key peak_GiB)")
    rep = sub.add_parser("report", help="render run folders (results.json) into one self-contained HTML page")
    rep.add_argument("dirs", nargs="+", metavar="DIR", help="run folders, e.g. reports/20261201-*")
    rep.add_argument("-o", "--output", default=None, help="the HTML file (default: report.html in the last DIR)")
    rep.add_argument("--no-plan", action="store_true", help="leave out the planner's fit table")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    if args.command == "env":
        return cmd_env(args)
    if args.command == "plan":
        return cmd_plan(args)
    if args.command == "report":
        return cmd_report(args)
    return cmd_check(args, extra)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
