"""The baseline store: stored figures per device class, compared with each run.

A *metric* is (test id, name, value, unit, which direction is better, tolerance with its reason).
Baselines live in ``<root>/<device-class>/<suite module>.json``, one file per suite module so a
diff stays reviewable. Each file records the environment every figure was measured in::

    {
      "schema": "scalellm.baselines/1",
      "device_class": "cpu-x86_64",
      "environments": {"<id>": {<fingerprint>}},
      "metrics": {"<test name>": {"<metric>": {"value": ..., "unit": ..., "better": ...,
                                              "tolerance": {...}, "samples": [...],
                                              "environment": "<id>"}}}
    }

Files change only through :meth:`BaselineStore.update`, which writes a temporary file beside the
target and renames it over (atomic on POSIX), under a lock so concurrent writers don't lose figures.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scalellm import environment, stats

SCHEMA = "scalellm.baselines/1"
DIRECTIONS = ("lower", "higher", "equal")

try:  # POSIX advisory locks; on other systems writers are not expected to run concurrently.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class BaselineError(Exception):
    """A baseline file that cannot be used; the message starts with the file's path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True)
class Tolerance:
    """How far a figure may move before it counts as a change; ``why`` justifies the numbers."""

    rel: float = 0.0  # fraction of the baseline value
    abs: float = 0.0  # in the metric's unit
    why: str = ""

    def allowed(self, baseline: float) -> float:
        return max(self.abs, self.rel * abs(baseline))

    def describe(self) -> str:
        parts = [f"rel {self.rel:g}"] if self.rel else []
        parts += [f"abs {self.abs:g}"] if self.abs else []
        text = " or ".join(parts) or "exact"
        return f"{text} ({self.why})" if self.why else text


@dataclass(frozen=True)
class Metric:
    test_id: str  # pytest node id, e.g. "suites/conformance/test_x.py::test_y[cpu]"
    name: str
    value: float
    unit: str
    better: str  # "lower", "higher" or "equal"
    tolerance: Tolerance = field(default_factory=Tolerance)
    samples: tuple[float, ...] | None = None  # repeated measurements; value is their median

    def __post_init__(self):
        if self.better not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: better={self.better!r}, expected one of {DIRECTIONS}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["samples"] = list(self.samples) if self.samples is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Metric":
        samples = data.get("samples")
        return cls(
            test_id=data["test_id"], name=data["name"], value=float(data["value"]), unit=data["unit"],
            better=data["better"], tolerance=Tolerance(**data.get("tolerance", {})),
            samples=tuple(samples) if samples is not None else None,
        )


@dataclass(frozen=True)
class Baseline:
    value: float
    unit: str
    better: str
    tolerance: Tolerance
    samples: tuple[float, ...] | None
    environment: dict  # the fingerprint it was measured in


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass", "fail" or "new"
    message: str
    baseline: Baseline | None = None


# ---------------------------------------------------------------- comparison


def compare(metric: Metric, baseline: Baseline | None, current_env: dict) -> Verdict:
    """The verdict on one measured figure against its stored baseline."""
    if math.isnan(metric.value):
        return Verdict("fail", f"{_label(metric)}: measured NaN", baseline)
    if baseline is None:
        return Verdict("new", f"{_label(metric)}: {_fmt(metric.value, metric.unit)} is new (no baseline)")
    if (baseline.unit, baseline.better) != (metric.unit, metric.better):
        return Verdict("fail", f"{_label(metric)}: baseline is in {baseline.unit!r} ({baseline.better} is better), "
                               f"measured in {metric.unit!r} ({metric.better} is better)", baseline)
    if metric.samples and baseline.samples and len(metric.samples) > 1 and len(baseline.samples) > 1:
        ok, detail = _compare_samples(metric, baseline)
    else:
        ok, detail = _compare_point(metric, baseline)
    if ok:
        return Verdict("pass", f"{_label(metric)}: {detail}", baseline)
    diffs = environment.differences(baseline.environment, current_env)
    env_line = ("environment differs from the baseline's: "
                + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in diffs.items())) if diffs else \
        "environment: same as the baseline's"
    return Verdict("fail", f"{_label(metric)}: {detail}\n  {env_line}", baseline)


def _compare_point(metric: Metric, baseline: Baseline) -> tuple[bool, str]:
    allowed = metric.tolerance.allowed(baseline.value)
    delta = metric.value - baseline.value
    worse = {"lower": delta > allowed, "higher": -delta > allowed, "equal": abs(delta) > allowed}[metric.better]
    rel = f" ({delta / baseline.value:+.2%})" if baseline.value else ""
    detail = (f"measured {_fmt(metric.value, metric.unit)}, baseline {_fmt(baseline.value, metric.unit)}, "
              f"tolerance {metric.tolerance.describe()}, {metric.better} is better; change {delta:+.6g}{rel}")
    return not worse, detail


def _compare_samples(metric: Metric, baseline: Baseline) -> tuple[bool, str]:
    interval = stats.median_ratio_interval(metric.samples, baseline.samples)
    worse = stats.regressed(interval, metric.better, metric.tolerance.rel)
    detail = (f"median {_fmt(metric.value, metric.unit)} over {len(metric.samples)} samples, baseline median "
              f"{_fmt(baseline.value, metric.unit)} over {len(baseline.samples)}; ratio {interval.ratio:.4f}, "
              f"{stats.CONFIDENCE:.0%} bootstrap interval [{interval.low:.4f}, {interval.high:.4f}], "
              f"tolerance {metric.tolerance.describe()}, {metric.better} is better")
    return not worse, detail


def _label(metric: Metric) -> str:
    return f"metric {metric.name!r} of {metric.test_id}"


def _fmt(value: float, unit: str) -> str:
    return f"{value:.6g} {unit}".rstrip()


# ---------------------------------------------------------------- files


def file_stem(test_id: str) -> str:
    """The file a test's metrics live in: 'suites/quality/test_ppl.py::t[cpu]' -> 'quality.test_ppl'."""
    path = test_id.split("::", 1)[0]
    parts = Path(path).with_suffix("").parts
    if parts and parts[0] == "suites":
        parts = parts[1:]
    return ".".join(parts)


def test_key(test_id: str) -> str:
    """The key inside the file: the node id less its path ('t[cpu]', 'TestX::t[cpu]')."""
    return test_id.split("::", 1)[1] if "::" in test_id else test_id


def _empty(device_class: str) -> dict:
    return {"schema": SCHEMA, "device_class": device_class, "environments": {}, "metrics": {}}


def read_file(path: Path, device_class: str) -> dict:
    """A validated baseline file; :class:`BaselineError` names the file and the problem."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(path, f"not valid JSON ({exc})") from exc
    except OSError as exc:
        raise BaselineError(path, f"cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise BaselineError(path, "top level is not a JSON object")
    if data.get("schema") != SCHEMA:
        raise BaselineError(path, f"schema is {data.get('schema')!r}, this scalellm reads {SCHEMA!r}")
    if data.get("device_class") != device_class:
        raise BaselineError(path, f"recorded for device class {data.get('device_class')!r} "
                                  f"but filed under {device_class!r}")
    envs, metrics = data.get("environments"), data.get("metrics")
    if not isinstance(envs, dict) or not isinstance(metrics, dict):
        raise BaselineError(path, "'environments' and 'metrics' must both be objects")
    for test, by_name in metrics.items():
        for name, record in (by_name.items() if isinstance(by_name, dict) else [(None, None)]):
            _check_record(path, test, name, record, envs)
    return data


def _check_record(path: Path, test: str, name: str | None, record, envs: dict) -> None:
    where = f"metric {name!r} of {test!r}"
    if not isinstance(record, dict):
        raise BaselineError(path, f"{where} is not an object")
    missing = [k for k in ("value", "unit", "better", "environment") if k not in record]
    if missing:
        raise BaselineError(path, f"{where} lacks {', '.join(missing)}")
    if not isinstance(record["value"], (int, float)) or isinstance(record["value"], bool):
        raise BaselineError(path, f"{where} has a non-numeric value {record['value']!r}")
    if record["better"] not in DIRECTIONS:
        raise BaselineError(path, f"{where} has better={record['better']!r}")
    if record["environment"] not in envs:
        raise BaselineError(path, f"{where} names environment {record['environment']!r}, which the file lacks")


class BaselineStore:
    """Baselines under ``root``: read lazily, validated, written only by :meth:`update`."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._cache: dict[Path, dict] = {}

    def path(self, device_class: str, test_id: str) -> Path:
        return self.root / device_class / f"{file_stem(test_id)}.json"

    def validate_all(self) -> list[Path]:
        """Read every file in the store; raises :class:`BaselineError` on the first bad one."""
        paths = sorted(self.root.glob("*/*.json")) if self.root.is_dir() else []
        for path in paths:
            self._read(path, path.parent.name)
        return paths

    def _read(self, path: Path, device_class: str) -> dict:
        if path not in self._cache:
            self._cache[path] = read_file(path, device_class) if path.exists() else _empty(device_class)
        return self._cache[path]

    def get(self, device_class: str, test_id: str, name: str) -> Baseline | None:
        data = self._read(self.path(device_class, test_id), device_class)
        record = data["metrics"].get(test_key(test_id), {}).get(name)
        if record is None:
            return None
        samples = record.get("samples")
        return Baseline(
            value=float(record["value"]), unit=record["unit"], better=record["better"],
            tolerance=Tolerance(**record.get("tolerance", {})),
            samples=tuple(samples) if samples else None,
            environment=data["environments"][record["environment"]],
        )

    def update(self, device_class: str, metrics: list[Metric], env: dict) -> list[Path]:
        """Store ``metrics`` (measured in ``env``) for ``device_class``; returns the files written."""
        by_path: dict[Path, list[Metric]] = {}
        for metric in metrics:
            by_path.setdefault(self.path(device_class, metric.test_id), []).append(metric)
        for path, group in sorted(by_path.items()):
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                data = read_file(path, device_class) if path.exists() else _empty(device_class)
                env_id = environment.fingerprint_id(env)
                data["environments"][env_id] = env
                for metric in group:
                    data["metrics"].setdefault(test_key(metric.test_id), {})[metric.name] = _record(metric, env_id)
                _drop_unused_environments(data)
                write_atomic(path, _dump(data))
            self._cache.pop(path, None)
        return sorted(by_path)


def _record(metric: Metric, env_id: str) -> dict:
    return {
        "value": metric.value, "unit": metric.unit, "better": metric.better,
        "tolerance": asdict(metric.tolerance),
        "samples": list(metric.samples) if metric.samples is not None else None,
        "environment": env_id,
    }


def _drop_unused_environments(data: dict) -> None:
    used = {r["environment"] for by_name in data["metrics"].values() for r in by_name.values()}
    data["environments"] = {k: v for k, v in data["environments"].items() if k in used}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file an ordinary file's mode
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _locked(path: Path):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
