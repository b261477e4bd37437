"""The Markdown summary of one run (``summary.md``) and the table ``scalellm check`` prints."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from scalellm.baselines import LEVELS, write_atomic
from scalellm.results import Run
from scalellm.tables import cross_method_table

STATUS_ORDER = ("fail", "new", "updated", "pass")


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def baseline_source(metric: dict) -> str:
    """Where a figure's baseline came from: 'kind cuda (cuda-nvidia-h100-80gb-hbm3)', or its scope when
    it had none ('none at class')."""
    if metric.get("baseline_applies_to"):
        level = metric.get("level") or ""
        where = "any" if level == "any" else f"{level} {metric['baseline_applies_to']}"
        return f"{where} ({metric.get('baseline_recorded_on') or '?'})"
    return f"none at {metric.get('scope', 'class')}"


def figure_counts(metrics: list[dict]) -> dict[str, dict[str, int]]:
    """{status: {level: n}}: checked figures by the level their baseline came from, new ones by their scope."""
    counts: dict[str, dict[str, int]] = {}
    for m in metrics:
        level = m.get("level") or m.get("scope", "class")
        by_level = counts.setdefault(m["status"], {})
        by_level[level] = by_level.get(level, 0) + 1
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    return {status: {lv: by[lv] for lv in LEVELS if lv in by} for status, by in
            sorted(counts.items(), key=lambda kv: rank.get(kv[0], 9))}


def figure_counts_line(metrics: list[dict]) -> str:
    """'figures: 120 pass (class 0, kind 80, any 40) · 40 new (class 40)' (checked by baseline level, new by scope)."""
    if not metrics:
        return "figures: none recorded"
    parts = [f"{sum(by.values())} {status} (" + ", ".join(f"{lv} {n}" for lv, n in by.items()) + ")"
             for status, by in figure_counts(metrics).items()]
    return "figures: " + " · ".join(parts)


def record_hint(metrics: list[dict]) -> str:
    """One line saying how to record the figures that had no baseline here, or ''."""
    new = [m for m in metrics if m["status"] == "new"]
    if not new:
        return ""
    classes = sorted({m["device_class"] for m in new if m.get("scope") == "class" and m.get("level") is None})
    where = f" (class {', '.join(classes)} has no baselines for them)" if classes else ""
    other_cpu = sum(1 for m in new if m.get("level") is not None)
    if other_cpu:
        where += f" ({other_cpu} of them were recorded on another CPU model of this class)"
    return (f"{len(new)} figure(s) have no baseline here{where}: they were reported, not checked. Record them with "
            "`scalellm check --update-baselines` on a passing run (`--update-levels class` writes only this "
            "machine's class figures).")


def orphan_lines(orphans: list[dict]) -> list[str]:
    """The warning about stored entries whose test no longer exists (``Run.orphaned``), one line per
    entry after a headline; [] when there are none."""
    if not orphans:
        return []
    what = "1 stored baseline entry names a test that no longer exists" if len(orphans) == 1 else \
        f"{len(orphans)} stored baseline entries name tests that no longer exist"
    head = (f"WARNING: {what}: the test module was collected in this run, the test id was not (whatever -m/-k "
            "selected), so nothing checks these figures. A passing run with --update-baselines removes them (and "
            "records a renamed test under its new id):")
    return [head] + [f"  {o['file']}: {o['test']} ({', '.join(o['metrics'])})" for o in orphans]


def metric_rows(run: Run) -> list[list[str]]:
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    ordered = sorted(run.metrics, key=lambda m: (rank.get(m["status"], 9), m["test_id"], m["name"]))
    return [[m["status"].upper(), m["device_class"], m["test_id"].split("::", 1)[-1], m["name"],
             _fmt(m["value"]), _fmt(m["baseline"]), baseline_source(m), m["unit"], m["better"]] for m in ordered]


ORPHAN_HEADER = ["baseline file", "test (stored key)", "figures"]


def orphan_rows(orphans: list[dict]) -> list[list[str]]:
    return [[o["file"], o["test"], ", ".join(o["metrics"])] for o in orphans]


METRIC_HEADER = ["status", "device class", "test", "metric", "measured", "baseline", "baseline from", "unit", "better"]


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
    parts += ["## Figures", "", figure_counts_line(run.metrics), ""]
    hint = record_hint(run.metrics)
    if hint:
        parts += [hint, ""]
    parts += [markdown_table(METRIC_HEADER, metric_rows(run)) if run.metrics else "No figures recorded.", ""]
    if run.updated:
        parts += ["## Baselines written", ""] + [f"- `{p}`" for p in run.updated] + [""]
    if run.orphaned:
        parts += ["## Orphaned baselines", "", f"**{orphan_lines(run.orphaned)[0]}**", "",
                  markdown_table(ORPHAN_HEADER, orphan_rows(run.orphaned)), ""]
    unsupported = Counter(t["reason"] for t in run.tests if t["outcome"] == "unsupported")
    if unsupported:
        parts += ["## Unsupported", "", "Failures of tests that used a library release older than its first kernels for the "
                  "device (`scalellm.packages.FIRST_WITH_KERNELS`):", "",
                  markdown_table(["tests", "reason"], [[str(n), r] for r, n in unsupported.most_common()]), ""]
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
    hint = record_hint(run.metrics)
    orphans = "\n\n" + "\n".join(orphan_lines(run.orphaned)) if run.orphaned else ""
    return f"{table}{quality}\n\n{figure_counts_line(run.metrics)}" + (f"\n{hint}" if hint else "") + \
        f"{orphans}\ntests: {counts}"
