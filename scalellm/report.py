"""The Markdown summary of one run (``summary.md``) and the table ``scalellm check`` prints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from scalellm.baselines import write_atomic
from scalellm.results import Run
from scalellm.tables import cross_method_table

STATUS_ORDER = ("fail", "new", "updated", "pass")


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def metric_rows(run: Run) -> list[list[str]]:
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    ordered = sorted(run.metrics, key=lambda m: (rank.get(m["status"], 9), m["test_id"], m["name"]))
    return [[m["status"].upper(), m["device_class"], m["test_id"].split("::", 1)[-1], m["name"],
             _fmt(m["value"]), _fmt(m["baseline"]), m["unit"], m["better"]] for m in ordered]


METRIC_HEADER = ["status", "device class", "test", "metric", "measured", "baseline", "unit", "better"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cell.replace("|", "\\|") for cell in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def skip_reasons(run: Run) -> Counter:
    return Counter(t["reason"] for t in run.tests if t["outcome"] == "skipped")


def summary_markdown(run: Run) -> str:
    counts = run.outcome_counts()
    parts = [f"# scalellm run, finished {run.finished}", ""]
    if run.interrupted:
        parts += ["**The run was interrupted: no baseline was written.**", ""]
    parts += ["Tests: " + ", ".join(f"{n} {k}" for k, n in counts.items()), ""]
    failed = [t for t in run.tests if t["outcome"] in ("failed", "error", "xpassed")]
    if failed:
        parts += ["## Failures", ""] + [f"- `{t['nodeid']}` ({t['outcome']}): {t['reason']}" for t in failed] + [""]
    header, rows = cross_method_table(run.metrics)
    if rows:
        parts += ["## Cross-method quality (real model)", "", markdown_table(header, rows), ""]
    parts += ["## Figures", ""]
    parts += [markdown_table(METRIC_HEADER, metric_rows(run)) if run.metrics else "No figures recorded.", ""]
    new = [m for m in run.metrics if m["status"] == "new"]
    if new:
        parts += [f"{len(new)} figure(s) have no baseline yet: they were reported, not checked. "
                  "Record them with `--update-baselines` on a passing run.", ""]
    if run.updated:
        parts += ["## Baselines written", ""] + [f"- `{p}`" for p in run.updated] + [""]
    reasons = skip_reasons(run)
    if reasons:
        parts += ["## Skipped", "", markdown_table(["tests", "reason"], [[str(n), r] for r, n in reasons.most_common()]),
                  ""]
    parts += ["## Environment", "", markdown_table(["key", "value"], [[k, _fmt(v)] for k, v in run.environment.items()]),
              ""]
    return "\n".join(parts)


def write_summary(directory: Path, run: Run) -> Path:
    path = Path(directory) / "summary.md"
    write_atomic(path, summary_markdown(run))
    return path


def terminal_summary(run: Run) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in run.outcome_counts().items())
    table = text_table(METRIC_HEADER, metric_rows(run)) if run.metrics else "no figures recorded"
    header, rows = cross_method_table(run.metrics)
    quality = f"\n\ncross-method quality (real model)\n{text_table(header, rows)}" if rows else ""
    return f"{table}{quality}\n\ntests: {counts}"
