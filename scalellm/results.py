"""One run's results as a file: ``results.json``, read by ``scalellm check`` and ``scalellm report``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scalellm.baselines import write_atomic

SCHEMA = "scalellm.results/1"

#: The registered markers (pyproject.toml), by family; a test's markers are recorded with its result.
DEVICE_MARKERS = ("cpu", "cuda", "mps", "multigpu")
METHOD_MARKERS = ("fp", "int8", "nf4", "fp4", "gptq", "gguf", "lora")
KIND_MARKERS = ("reference", "quality", "memory", "throughput", "slow")
MARKERS = DEVICE_MARKERS + METHOD_MARKERS + KIND_MARKERS


@dataclass
class Run:
    tests: list[dict]  # {nodeid, outcome, duration_s, reason, markers}
    metrics: list[dict]  # Metric fields + device, device_class, status, message, baseline
    environment: dict
    updated: list[str] = field(default_factory=list)  # baseline files this run wrote
    # stored entries whose test no longer exists (its module was collected, its test id was not):
    # {file, applies_to, test (the entry's key), metrics}; scalellm.baselines.BaselineStore.orphans
    orphaned: list[dict] = field(default_factory=list)
    interrupted: bool = False
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def outcome_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for test in self.tests:
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
        return dict(sorted(counts.items()))


def write(directory: Path, run: Run) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    write_atomic(path, json.dumps({"schema": SCHEMA, **asdict(run)}, indent=1, sort_keys=True) + "\n")
    return path


def read(directory: Path) -> Run:
    path = Path(directory) / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as results ({exc})") from exc
    if data.pop("schema", None) != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file")
    return Run(**data)
