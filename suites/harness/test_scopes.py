"""The scope rules (suites/helpers/scopes.py) against the committed baseline store, and the schema-1 migration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scalellm import baselines
from scalellm.baselines import LEVELS, BaselineStore
from suites.helpers import scopes

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "baselines"


def stored_figures():
    """(folder, test id, metric name) of every figure in the committed store."""
    for path in sorted(STORE.glob("*/*.json")):
        data = json.loads(path.read_text())
        for key, by_name in data["metrics"].items():
            for name in by_name:
                yield path.parent.name, f"suites/{path.stem.replace('.', '/')}.py::{key}", name


def test_the_committed_store_is_valid():
    assert BaselineStore(STORE).validate_all()


def test_every_rule_names_a_level_and_its_evidence():
    for rule in scopes.RULES:
        assert rule.scope in LEVELS and len(rule.why) > 20, rule


def test_every_stored_figure_has_a_rule_and_sits_where_its_rule_files_it():
    misplaced = []
    for folder, test_id, name in stored_figures():
        rule = scopes.rule_for(test_id, name)
        assert rule is not scopes.DEFAULT, f"no scope rule names {name!r} of {test_id} (suites/helpers/scopes.py)"
        if baselines.level_of(folder) != rule.scope:
            misplaced.append(f"{folder}: {test_id} {name} (rule: {rule.scope})")
    assert not misplaced, "figures filed at another level than their rule's scope:\n" + "\n".join(misplaced)


def test_an_unnamed_figure_is_class_scoped():
    assert scopes.rule_for("suites/new/test_thing.py::t[cpu]", "speed").scope == "class"


def test_the_first_matching_rule_wins():
    assert scopes.rule_for("suites/model/test_quality.py::t[cpu-bf16]", "dlogit_p999:bf16").scope == "kind"
    assert scopes.rule_for("suites/model/test_quality.py::t[cpu-bf16]", "perplexity:bf16").scope == "any"


# ---- scripts/migrate_baselines.py


def v1_file(path: Path, device_class: str, env: dict, metrics: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = {key: {name: {"value": v, "unit": "ppl", "better": "lower", "environment": "e", "samples": None,
                            "tolerance": {"rel": 0.01, "abs": 0.0, "why": "demo"}} for name, v in by.items()}
               for key, by in metrics.items()}
    path.write_text(json.dumps({"schema": baselines.SCHEMA_V1, "device_class": device_class,
                                "environments": {"e": env}, "metrics": records}))


INTEL = {"cpu": "Intel(R) Xeon(R) Processor", "cpu_flags": "avx2,fma,f16c,avx512f,avx512_bf16,amx_bf16"}


def migrate(store: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "migrate_baselines.py"), str(store), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_migration_files_each_record_where_its_scope_says_and_keeps_its_value(tmp_path):
    v1_file(tmp_path / "cpu-x86_64" / "model.test_quality.json", "cpu-x86_64", INTEL,
            {"test_quality_against_fp32_reference[cpu-nf4]": {"perplexity:nf4": 17.5, "dlogit_p999:nf4": 7.3},
             "test_quality_against_fp32_reference[cpu-bf16]": {"perplexity:bf16": 14.3}})
    v1_file(tmp_path / "cuda-nvidia-h100-80gb-hbm3" / "model.test_quality.json", "cuda-nvidia-h100-80gb-hbm3",
            {"gpu": "NVIDIA H100 80GB HBM3"},
            {"test_quality_against_fp32_reference[cuda-nf4]": {"perplexity:nf4": 17.51, "dlogit_p999:nf4": 7.2}})
    v1_file(tmp_path / "cuda-nvidia-h100-80gb-hbm3" / "model.test_generation.json", "cuda-nvidia-h100-80gb-hbm3",
            {"gpu": "NVIDIA H100 80GB HBM3"}, {"test_prefill_and_decode_throughput[cuda-nf4]": {"decode_tok_s:nf4": 20.5}})
    done = migrate(tmp_path)
    assert done.returncode == 0, done.stderr
    store = BaselineStore(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in store.validate_all()) == [
        "any/model.test_quality.json", "cpu/model.test_quality.json",
        "cuda-nvidia-h100-80gb-hbm3/model.test_generation.json", "cuda/model.test_quality.json"]
    got = store.get("cpu-amd-epyc-avx2-2c", "suites/model/test_quality.py::test_quality_against_fp32_reference[cpu-nf4]",
                    "perplexity:nf4", "any")
    assert (got.value, got.level, got.recorded_on, got.environment) == (17.5, "any", "cpu-intel-xeon-amx-2c", INTEL)
    cuda = store.get("cuda-nvidia-h200", "suites/model/test_quality.py::test_quality_against_fp32_reference[cuda-nf4]",
                     "dlogit_p999:nf4", "kind")
    assert (cuda.value, cuda.level, cuda.recorded_on) == (7.2, "kind", "cuda-nvidia-h100-80gb-hbm3")
    assert "agree; keeping cpu-intel-xeon-amx-2c" in done.stdout
    assert migrate(tmp_path).stdout.strip().endswith("no schema-1 files; nothing to do")


def test_migration_stops_where_two_devices_disagree_on_an_any_figure(tmp_path):
    v1_file(tmp_path / "cpu-x86_64" / "model.test_quality.json", "cpu-x86_64", INTEL,
            {"test_quality_against_fp32_reference[cpu-nf4]": {"perplexity:nf4": 17.5}})
    v1_file(tmp_path / "cuda-x" / "model.test_quality.json", "cuda-x", {},
            {"test_quality_against_fp32_reference[cuda-nf4]": {"perplexity:nf4": 19.0}})
    before = {p: p.read_text() for p in tmp_path.glob("*/*.json")}
    done = migrate(tmp_path)
    assert done.returncode != 0 and "the rule in suites/helpers/scopes.py is wrong for this figure" in done.stderr
    assert {p: p.read_text() for p in tmp_path.glob("*/*.json")} == before  # nothing recorded is lost


def test_the_store_reports_a_schema1_file_with_the_migration_command(tmp_path):
    v1_file(tmp_path / "cpu-x86_64" / "model.test_quality.json", "cpu-x86_64", INTEL, {})
    with pytest.raises(baselines.BaselineError, match="migrate_baselines.py"):
        BaselineStore(tmp_path).validate_all()
