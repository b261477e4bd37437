"""``scalellm report``: one self-contained HTML page from synthetic runs with a planted regression."""

from __future__ import annotations

import re

import numpy as np
import pytest

from scalellm import cli, html_report, results

pytestmark = [pytest.mark.throughput]

#: The noise model of suites/harness/test_stats.py: 15 samples, 1.5% noise, 2% tolerance.
N_SAMPLES, NOISE_SD, TOLERANCE = 15, 0.015, 0.02
BASE_ENV = {"python": "3.11.9", "torch": "2.13.0", "bitsandbytes": "0.50.2", "transformers": "5.24.0"}
NEW_ENV = {**BASE_ENV, "bitsandbytes": "0.51.0"}


def samples(seed: int, scale: float = 1.0) -> list[float]:
    return list(scale * 100.0 * (1.0 + NOISE_SD * np.random.default_rng(seed).standard_normal(N_SAMPLES)))


def metric(name, value, status, *, baseline=100.0, samples_=None, better="higher", env=BASE_ENV, unit="tok/s"):
    return {"test_id": f"suites/throughput/test_decode.py::test_{name}[cpu]", "name": name, "value": value,
            "unit": unit, "better": better, "tolerance": {"rel": TOLERANCE, "abs": 0.0, "why": "test"},
            "samples": samples_, "device": "cpu", "device_class": "cpu-x86_64", "status": status,
            "message": f"{name}: {status}", "baseline": baseline, "baseline_environment": env}


def write_run(path, stamp, metrics, env):
    tests = [{"nodeid": m["test_id"], "outcome": "failed" if m["status"] == "fail" else "passed",
              "duration_s": 0.1, "reason": "", "markers": ["cpu"]} for m in metrics]
    results.write(path, results.Run(tests=tests, metrics=metrics, environment=env, finished=stamp))
    return path


@pytest.fixture
def runs(tmp_path):
    """Three nightly runs: two clean, the third with a 5% decode slowdown and a new bitsandbytes."""
    dirs = []
    for i, (scale, env) in enumerate([(1.0, BASE_ENV), (1.0, BASE_ENV), (0.95, NEW_ENV)]):
        decode = samples(100 + i, scale)
        status = "fail" if scale < 1 else "pass"
        dirs.append(write_run(tmp_path / f"run{i}", f"2026-12-0{i + 1}T03:00:00+0000", [
            metric("decode_tok_s", float(np.median(decode)), status, samples_=decode),
            metric("prefill_tok_s", float(np.median(samples(200 + i))), "pass", samples_=samples(200 + i)),
            metric("perplexity:nf4", 18.4 + 0.01 * i, "pass", baseline=18.4, better="lower", unit="ppl"),
            metric("perplexity:bf16", 14.8, "pass", baseline=14.8, better="lower", unit="ppl"),
        ], env))
    return dirs


@pytest.fixture
def page(runs):
    return html_report.render(html_report.load_runs(reversed(runs)), fit_models=["smollm2-135m"])


def _row(page, name):
    rows = re.findall(r"<tr class=\"\w+\">.*?</tr>", page, flags=re.S)
    return next(r for r in rows if f"<td>{name}</td>" in r)


def test_the_page_has_a_status_table_with_the_regression_first(page):
    assert 'id="status-table"' in page
    first = re.search(r"<tr class=\"(\w+)\">", page).group(1)
    assert first == "fail"


def test_trend_plots_are_embedded_png_data_uris(page):
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 4  # one per figure
    assert all(len(u) > 1000 for u in uris)


def test_the_environment_difference_stands_beside_the_regression(page):
    row = _row(page, "decode_tok_s")
    assert "bitsandbytes: 0.50.2 &rarr; 0.51.0" in row


def test_a_passing_figure_carries_no_environment_difference(page):
    assert "bitsandbytes" not in _row(page, "prefill_tok_s")


def test_the_rule_flags_the_planted_slowdown_and_not_the_clean_rerun(page):
    assert "REGRESSED" in _row(page, "decode_tok_s")
    assert "no regression" in _row(page, "prefill_tok_s")


@pytest.mark.parametrize("seed", range(3))
def test_rule_verdict_flags_a_five_percent_slowdown(seed):
    prev = {"samples": samples(seed), "better": "higher", "tolerance": {"rel": TOLERANCE}}
    slow = {"samples": samples(seed + 50, 0.95), "better": "higher", "tolerance": {"rel": TOLERANCE}}
    clean = {"samples": samples(seed + 50), "better": "higher", "tolerance": {"rel": TOLERANCE}}
    assert html_report.rule_verdict(slow, prev).startswith("REGRESSED")
    assert html_report.rule_verdict(clean, prev).startswith("no regression")


def test_the_cross_method_table_and_fit_table_are_present(page):
    pytest.importorskip("scalellm.tables")
    assert 'id="quality-table"' in page
    assert 'id="fit-table"' in page and "smollm2-135m" in page


def test_the_page_is_self_contained(page):
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page, flags=re.I)
    assert refs, "expected image sources"
    assert not [r for r in refs if not r.startswith("data:")]
    assert not re.search(r"https?://", page)
    assert "@import" not in page and "url(" not in page


def test_cli_report_writes_the_page(runs, tmp_path, capsys):
    out = tmp_path / "nightly.html"
    code = cli.main(["report", *map(str, runs), "-o", str(out), "--no-plan"])
    assert code == 0 and out.is_file()
    assert 'id="status-table"' in out.read_text()


def test_cli_report_on_a_folder_without_results_is_exit_code_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "cannot be read as results" in capsys.readouterr().err


def test_orphaned_baselines_are_counted_at_the_top_and_listed(tmp_path):
    orphan = {"file": "baselines/any/gptq.test_reference.json", "applies_to": "any", "test": "test_old[nf4]",
              "metrics": ["error", "speed"]}
    results.write(tmp_path, results.Run(tests=[], metrics=[], environment=BASE_ENV, orphaned=[orphan],
                                        finished="2026-12-04T03:00:00+0000"))
    page = html_report.render(html_report.load_runs([tmp_path]), include_fit=False)
    assert '<span class="new">1 orphaned baseline(s): see below</span>' in page
    table = re.search(r'<table id="orphan-table">.*?</table>', page, flags=re.S).group(0)
    assert "<td>baselines/any/gptq.test_reference.json</td><td>test_old[nf4]</td><td>error, speed</td>" in table
    assert "WARNING: 1 stored baseline entry names a test that no longer exists" in page
