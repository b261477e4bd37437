"""The nightly report: ``scalellm report DIR...`` -> one self-contained HTML page.

From one or more run folders (each with the ``results.json`` :mod:`scalellm.results` writes), in the
order of their finishing times, the page shows

- every figure of the latest run with its status against its stored baseline, and beside each
  regression the environment and library-version differences between the baseline and the run
  (:func:`scalellm.environment.differences`);
- for figures measured as repeated samples, the run-over-run verdict of the noise-aware rule
  (:mod:`scalellm.stats`: 95% bootstrap interval of the median ratio, regression only when the whole
  interval is beyond the tolerance) between the latest run and the one before it;
- trend lines of each figure over the runs given (matplotlib PNGs embedded as base64 data URIs);
- the stored baseline entries whose test no longer exists (orphaned), as the latest run found them;
- the cross-method quality table (:mod:`scalellm.tables`, when present) and the planner's fit table.

No file outside the page is referenced: styles are inline, images are ``data:`` URIs.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from scalellm import environment, planner, report, results, stats
from scalellm.report import STATUS_ORDER

#: Trend plots drawn at most (the rest are listed in the table only), to keep the page small.
MAX_TREND_PLOTS = 60
#: The planner settings of the fit table: what a consumer-card user asks most.
FIT_SETTINGS = (
    planner.Setting("bf16", "inference", seq=4096),
    planner.Setting("nf4", "inference", seq=4096),
    planner.Setting("nf4", "qlora", seq=1024, batch=4, grad_checkpointing=True),
    planner.Setting("bf16", "lora", seq=1024, batch=4, grad_checkpointing=True),
)


@dataclass
class RunEntry:
    label: str  # the run folder's name
    run: results.Run
    path: Path


def load_runs(directories) -> list[RunEntry]:
    """The runs in ``directories``, oldest first (by their ``finished`` stamps, then by name)."""
    entries = [RunEntry(Path(d).name or str(d), results.read(Path(d)), Path(d)) for d in directories]
    return sorted(entries, key=lambda e: (e.run.finished, e.label))


def _key(metric: dict) -> tuple[str, str, str]:
    return metric["device_class"], metric["test_id"], metric["name"]


def rule_verdict(current: dict, previous: dict | None) -> str:
    """The noise-aware rule between two runs' samples of one figure, as one line ('' if not sampled)."""
    if previous is None or not current.get("samples") or not previous.get("samples"):
        return ""
    if len(current["samples"]) < 2 or len(previous["samples"]) < 2:
        return ""
    interval = stats.median_ratio_interval(current["samples"], previous["samples"])
    tol = (current.get("tolerance") or {}).get("rel", 0.0)  # the test's own (the store keeps no copy)
    flagged = stats.regressed(interval, current["better"], tol)
    return (f"{'REGRESSED' if flagged else 'no regression'}: median ratio {interval.ratio:.3f}, "
            f"{stats.CONFIDENCE:.0%} CI [{interval.low:.3f}, {interval.high:.3f}], tolerance {tol:.1%}")


def status_rows(entries: list[RunEntry]) -> list[dict]:
    """One row per figure of the latest run, regressions first."""
    latest = entries[-1].run
    previous = {}
    for entry in entries[:-1]:
        for m in entry.run.metrics:
            previous[_key(m)] = m
    rank = {s: i for i, s in enumerate(STATUS_ORDER)}
    rows = []
    for m in sorted(latest.metrics, key=lambda m: (rank.get(m["status"], 9), m["test_id"], m["name"])):
        diffs = {}
        if m["status"] == "fail" and m.get("baseline_environment"):
            diffs = environment.differences(m["baseline_environment"], latest.environment)
        verdict = rule_verdict(m, previous.get(_key(m)))
        rows.append({"status": m["status"], "device_class": m["device_class"],
                     "test": m["test_id"].split("::", 1)[-1], "name": m["name"], "value": m["value"],
                     "baseline": m.get("baseline"), "source": report.baseline_source(m),
                     "unit": m["unit"], "better": m["better"],
                     "message": m.get("message", ""), "env_diff": diffs, "rule": verdict,
                     "rule_flagged": verdict.startswith("REGRESSED")})
    return rows


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def trend_plots(entries: list[RunEntry]) -> list[dict]:
    """[{title, uri}] one small line plot per figure seen in the runs (value vs run, baseline dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, list[tuple[int, float, float | None]]] = {}
    for index, entry in enumerate(entries):
        for m in entry.run.metrics:
            series.setdefault(_key(m), []).append((index, m["value"], m.get("baseline")))
    plots = []
    for key in sorted(series)[:MAX_TREND_PLOTS]:
        points = series[key]
        fig, ax = plt.subplots(figsize=(3.4, 1.8))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1.2)
        baselines = [p[2] for p in points if p[2] is not None]
        if baselines:
            ax.axhline(baselines[-1], color="grey", ls="--", lw=0.8)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels([str(i + 1) for i in range(len(entries))], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{key[2]}", fontsize=8)
        plots.append({"title": f"{key[1].split('::', 1)[-1]} · {key[2]} ({key[0]})", "uri": _png(fig)})
        plt.close(fig)
    return plots


def quality_table(metrics: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The cross-method table from :mod:`scalellm.tables`, or None when that module is absent."""
    try:
        from scalellm.tables import cross_method_table
    except ImportError:
        return None
    header, rows = cross_method_table(metrics)
    return (header, rows) if rows else None


def fit_rows(models=None, settings=FIT_SETTINGS) -> list[dict]:
    from scalellm import shapes

    return planner.fit_table(models if models is not None else shapes.list_shapes(), settings)


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scalellm nightly report</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
td:nth-child(2){white-space:nowrap}
th{background:#f0f0f0}
.fail{background:#fdd}.new{background:#ffd}.pass{background:#dfd}.updated{background:#def}
.yes{color:#060}.no{color:#a00;font-weight:bold}
.envdiff{font-size:12px;color:#600}
.glance span{padding:2px 8px;margin-right:4px;font-weight:bold}
.trends{display:flex;flex-wrap:wrap;gap:8px}
.trend{border:1px solid #ddd;padding:4px;font-size:11px;max-width:300px}
</style></head><body>
<h1>scalellm nightly report</h1>
<p>{{ runs|length }} run(s), oldest first:
{% for e in runs %}<b>{{ loop.index }}</b> {{ e.label }} ({{ e.run.finished }}){% if not loop.last %}, {% endif %}{% endfor %}.
Latest: tests {% for k, n in counts.items() %}{{ n }} {{ k }}{% if not loop.last %}, {% endif %}{% endfor %}.</p>
{% if interrupted %}<p><b>The latest run was interrupted: no baseline was written.</b></p>{% endif %}

<h2 id="status">Status against baselines</h2>
<p class="glance">{% for k, n in status_counts.items() %}<span class="{{ k }}">{{ n }} {{ k|upper }}</span> {% endfor %}
{% if flagged %}<span class="fail">{{ flagged }} run-over-run regression(s)</span>{% endif %}
{% if orphaned %}<span class="new">{{ orphaned|length }} orphaned baseline(s): see below</span>{% endif %}</p>
<p id="levels">{{ level_line }}{% if record_hint %}<br>{{ record_hint }}{% endif %}</p>
<p>Regression rule for repeated samples: {{ rule }}</p>
{% macro status_table(rows, id) %}
<table id="{{ id }}">
<tr><th>status</th><th>device class</th><th>test</th><th>metric</th><th>measured</th><th>baseline</th>
<th>baseline from</th><th>unit</th>
<th>better</th><th>run-over-run rule</th><th>environment differences (baseline &rarr; run)</th></tr>
{% for r in rows %}
<tr class="{{ r.status }}"><td>{{ r.status|upper }}</td><td>{{ r.device_class }}</td><td>{{ r.test }}</td>
<td>{{ r.name }}</td><td>{{ fmt(r.value) }}</td><td>{{ fmt(r.baseline) }}</td><td>{{ r.source }}</td><td>{{ r.unit }}</td>
<td>{{ r.better }}</td><td>{{ r.rule }}</td>
<td class="envdiff">{% if r.env_diff %}<ul>{% for k, ab in r.env_diff.items() %}<li>{{ k }}: {{ ab[0] }} &rarr; {{ ab[1] }}</li>{% endfor %}</ul>
{% elif r.status == 'fail' %}same as the baseline's{% endif %}</td></tr>
{% endfor %}
</table>
{% endmacro %}
{% if attention %}<h3>Needs a look: failed, new, or flagged by the run-over-run rule</h3>
{{ status_table(attention, "status-table") }}{% endif %}
{% if passing %}<details{% if not attention %} open{% endif %}><summary>{{ passing|length }} figure(s) within their tolerance</summary>
{{ status_table(passing, "passing-table" if attention else "status-table") }}</details>{% endif %}
{% if not attention and not passing %}<p>No figures recorded.</p>{% endif %}
{% if orphaned %}
<h3 id="orphaned" class="new">Orphaned baselines: {{ orphaned|length }}</h3>
<p><b>{{ orphan_warning }}</b></p>
<table id="orphan-table"><tr>{% for h in orphan_header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in orphaned %}<tr class="new">{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% endif %}

<h2 id="trends">Trends over the runs</h2>
<div class="trends">
{% for p in plots %}<div class="trend"><img alt="{{ p.title }}" src="{{ p.uri }}"><br>{{ p.title }}</div>{% endfor %}
</div>

<h2 id="quality">Cross-method quality</h2>
{% if quality %}
<table id="quality-table"><tr>{% for h in quality[0] %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in quality[1] %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>
{% else %}<p>No per-method quality figures in the latest run.</p>{% endif %}

<h2 id="fit">Will it fit? (scalellm plan)</h2>
{% if fit %}
<table id="fit-table"><tr><th>model</th><th>method</th><th>task</th><th>predicted peak GiB</th>
{% for c in cards %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in fit %}<tr><td>{{ r.model }}</td><td>{{ r.method }}</td><td>{{ r.task }}</td><td>{{ r.peak_GiB }}</td>
{% for c in cards %}<td class="{{ 'yes' if r[c] else 'no' }}">{{ 'yes' if r[c] else 'no' }}</td>{% endfor %}</tr>{% endfor %}
</table>
<p>Inference: a prefill of the whole context (4,096 tokens); QLoRA/LoRA: r=16, batch 4 &times; 1,024, gradient
checkpointing, AdamW. Peaks include the CUDA context and allocator slack.</p>
{% else %}<p>Planner table left out.</p>{% endif %}

<h2 id="environment">Environment of the latest run</h2>
<table>{% for k, v in env.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
</body></html>
"""


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def render(entries: list[RunEntry], *, fit_models=None, include_fit: bool = True) -> str:
    """The page for ``entries`` (oldest first) as one HTML string."""
    import jinja2

    if not entries:
        raise ValueError("no runs to report")
    latest = entries[-1].run
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(TEMPLATE)
    rule = (f"ratio of medians with a {stats.CONFIDENCE:.0%} percentile bootstrap interval "
            f"({stats.BOOTSTRAP_RESAMPLES} resamples, seed {stats.SEED}); a regression only when the "
            "whole interval lies beyond the figure's relative tolerance (scalellm.stats)")
    rows = status_rows(entries)
    settled = ("pass", "updated")  # inside tolerance, or just written as the new baseline
    attention = [r for r in rows if r["status"] not in settled or r["rule_flagged"]]
    passing = [r for r in rows if r["status"] in settled and not r["rule_flagged"]]
    status_counts: dict[str, int] = {}
    for r in rows:
        status_counts[r["status"]] = status_counts.get(r["status"], 0) + 1
    return template.render(
        runs=entries, counts=latest.outcome_counts(), interrupted=latest.interrupted, attention=attention,
        passing=passing, status_counts=status_counts, flagged=sum(r["rule_flagged"] for r in rows),
        level_line=report.figure_counts_line(latest.metrics), record_hint=report.record_hint(latest.metrics),
        plots=trend_plots(entries), quality=quality_table(latest.metrics), rule=rule,
        fit=fit_rows(fit_models) if include_fit else [], cards=[f"{g} GiB" for g in planner.CARDS_GIB],
        env=latest.environment, fmt=_fmt, orphaned=report.orphan_rows(latest.orphaned),
        orphan_warning=(report.orphan_lines(latest.orphaned) or [""])[0].removesuffix(":"),
        orphan_header=report.ORPHAN_HEADER)


def write(directories, output: Path | None = None, **kwargs) -> Path:
    """Render the runs in ``directories`` into ``output`` (default: ``report.html`` in the latest run's folder)."""
    from scalellm.baselines import write_atomic

    entries = load_runs(directories)
    html = render(entries, **kwargs)
    output = Path(output) if output else entries[-1].path / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, html)
    return output
