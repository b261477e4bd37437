"""The baseline store: stored figures, each filed where it applies, compared with each run.

A *metric* is (test id, name, value, unit, which direction is better, tolerance with its reason,
scope). Its *scope* is the widest set of machines on which the figure must agree, given the same
library stack (the rules that choose it: ``suites/helpers/scopes.py``):

- ``any``: every device (reference-vs-library facts, round-trip errors, device-independent quality);
- ``kind``: one device kind, ``cpu``, ``cuda`` or ``mps`` (allocator peaks, bytes held, quality
  figures whose kernels differ by kind);
- ``class``: one hardware model, its device class (``scalellm.devices``: throughput, anything that
  depends on the chip).

Baselines live in ``<root>/<applies to>/<suite module>.json``, where *applies to* is ``any``, a kind
(``cuda``) or a class (``cuda-nvidia-h100-80gb-hbm3``). A run looks a figure up at its class, then
its kind, then ``any``, never wider than the figure's scope, and says which level and which machine
the baseline came from. Keys are node ids less their path and device (``test_x[nf4]``), so a cpu
and a cuda run of one test meet at one ``kind``/``any`` entry. Each file records the environment
every figure was measured in::

    {
      "schema": "scalellm.baselines/2",
      "applies_to": "cuda", "level": "kind",
      "environments": {"<id>": {<fingerprint>}},
      "metrics": {"<test key>": {"<metric>": {"value": ..., "unit": ..., "better": ..., "samples": [...],
                                             "environment": "<id>", "recorded_on": "<device class>"}}}
    }

A figure's tolerance lives in one place, the test that records it (``record_metric(...,
tolerance=Tolerance(...))``): the comparison uses that one, so the store keeps no copy (a copy
would only drift from the code). An entry written before that, with a ``"tolerance"`` key, is read
as if it had none (``scripts/drop_stored_tolerances.py`` removed them from the committed store).

An entry whose test no longer exists is found by :meth:`BaselineStore.orphans` (the recorder
reports them at the end of a run: ``suites/helpers/recorder.py``).

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
from scalellm.devices import DEVICES

SCHEMA = "scalellm.baselines/2"
#: The layout before scopes: one folder per device class. ``scripts/migrate_baselines.py`` converts it.
SCHEMA_V1 = "scalellm.baselines/1"
DIRECTIONS = ("lower", "higher", "equal")
#: Where a baseline applies, narrowest first: the order in which a figure is looked up.
LEVELS = ("class", "kind", "any")
#: The folder of figures that apply on every device.
ANY = "any"

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
    scope: str = "class"  # the widest level its baseline applies at (LEVELS)

    def __post_init__(self):
        if self.better not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: better={self.better!r}, expected one of {DIRECTIONS}")
        if self.scope not in LEVELS:
            raise ValueError(f"metric {self.name!r}: scope={self.scope!r}, expected one of {LEVELS}")

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
            samples=tuple(samples) if samples is not None else None, scope=data.get("scope", "class"),
        )


@dataclass(frozen=True)
class Baseline:
    """A stored figure. It has no tolerance: the measured :class:`Metric` brings its test's."""

    value: float
    unit: str
    better: str
    samples: tuple[float, ...] | None
    environment: dict  # the fingerprint it was measured in
    applies_to: str = ""  # the folder it was found in: a device class, a kind or "any"
    recorded_on: str = ""  # the device class of the machine that measured it

    @property
    def level(self) -> str:
        return level_of(self.applies_to) if self.applies_to else ""

    def provenance(self) -> str:
        """'kind cuda, recorded on cuda-nvidia-h100-80gb-hbm3'."""
        where = f"{self.level} {self.applies_to}" if self.level != "any" else "any device"
        return f"{where}, recorded on {self.recorded_on or 'an unnamed machine'}"


@dataclass(frozen=True)
class Orphan:
    """A stored entry whose test no longer exists: its suite module was collected, its test id was not."""

    path: Path  # the baseline file
    applies_to: str  # its folder: a device class, a kind or "any"
    key: str  # the entry's test key (:func:`test_key`)
    metrics: tuple[str, ...]  # the figures stored under it

    def to_json(self) -> dict:
        return {"file": str(self.path), "applies_to": self.applies_to, "test": self.key, "metrics": list(self.metrics)}


@dataclass(frozen=True)
class Verdict:
    status: str  # "pass", "fail" or "new"
    message: str
    baseline: Baseline | None = None


# ---------------------------------------------------------------- comparison


def compare(metric: Metric, baseline: Baseline | None, current_env: dict, looked_in: tuple[str, ...] = ()) -> Verdict:
    """The verdict on one measured figure against its stored baseline (``looked_in``: where a missing
    one was looked for, for the message)."""
    if math.isnan(metric.value):
        return Verdict("fail", f"{_label(metric)}: measured NaN", baseline)
    if baseline is None:
        where = f" at {', '.join(looked_in)}" if looked_in else ""
        return Verdict("new", f"{_label(metric)}: {_fmt(metric.value, metric.unit)} is new (no baseline{where}; "
                              f"scope {metric.scope})")
    elsewhere = other_cpu_model(baseline, current_env)
    if elsewhere:
        return Verdict("new", f"{_label(metric)}: {_fmt(metric.value, metric.unit)} is new here ({elsewhere}; "
                              f"scope {metric.scope})")
    if (baseline.unit, baseline.better) != (metric.unit, metric.better):
        return Verdict("fail", f"{_label(metric)}: baseline is in {baseline.unit!r} ({baseline.better} is better), "
                               f"measured in {metric.unit!r} ({metric.better} is better)", baseline)
    if metric.samples and baseline.samples and len(metric.samples) > 1 and len(baseline.samples) > 1:
        ok, detail = _compare_samples(metric, baseline)
    else:
        ok, detail = _compare_point(metric, baseline)
    if baseline.applies_to:
        detail += f"; baseline from {baseline.provenance()}"
    if ok:
        return Verdict("pass", f"{_label(metric)}: {detail}", baseline)
    diffs = environment.differences(baseline.environment, current_env)
    env_line = ("environment differs from the baseline's: "
                + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in diffs.items())) if diffs else \
        "environment: same as the baseline's"
    return Verdict("fail", f"{_label(metric)}: {detail}\n  {env_line}", baseline)


def other_cpu_model(baseline: Baseline, current_env: dict) -> str | None:
    """Why a cpu class baseline does not apply on this machine, or None.

    A cpu class names vendor, ISA path and cores (``scalellm.devices.cpu_class``), not the
    microarchitecture: a VM's 'AMD EPYC' is several generations whose kernels run at different
    speeds. A class figure recorded with its CPU model id applies only to that model; one recorded
    without (before the id was kept) applies to its whole class."""
    if baseline.level != "class" or not baseline.applies_to.startswith("cpu-"):
        return None
    theirs, ours = baseline.environment.get("cpu_model_id"), current_env.get("cpu_model_id")
    if theirs and ours and theirs != ours:
        return f"the class baseline was recorded on CPU {theirs}, this machine's is {ours}"
    return None


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


def test_key(test_id: str, device: str | None = None) -> str:
    """The key inside the file: the node id less its path and its device parameter
    ('t[cpu-nf4]' -> 't[nf4]', 't[cpu]' -> 't', 'TestX::t[cuda]' -> 'TestX::t')."""
    key = test_id.split("::", 1)[1] if "::" in test_id else test_id
    if device is None or not key.endswith("]") or "[" not in key:
        return key
    name, params = key[:-1].split("[", 1)
    parts = params.split("-")
    if device in parts:
        parts.remove(device)  # the device's id is its name (conftest's parametrization)
    return f"{name}[{'-'.join(parts)}]" if parts else name


def level_of(applies_to: str) -> str:
    """The level of a store folder: 'any', a kind ('cpu') or a device class ('cpu-amd-epyc-avx2-2c')."""
    if applies_to == ANY:
        return "any"
    return "kind" if applies_to in DEVICES else "class"


def lookup_order(device_class: str, scope: str) -> tuple[str, ...]:
    """The folders a figure of ``scope`` measured on ``device_class`` is looked up in, narrowest first."""
    names = {"class": device_class, "kind": device_class.split("-", 1)[0], "any": ANY}
    return tuple(names[level] for level in LEVELS[:LEVELS.index(scope) + 1])


def applies_to(device_class: str, scope: str) -> str:
    """The folder a figure of ``scope`` measured on ``device_class`` is written to."""
    return lookup_order(device_class, scope)[-1]


def _empty(applies: str) -> dict:
    return {"schema": SCHEMA, "applies_to": applies, "level": level_of(applies), "environments": {}, "metrics": {}}


def read_file(path: Path, applies: str) -> dict:
    """A validated baseline file of the folder ``applies``; :class:`BaselineError` names the file and the problem."""
    if applies.split("-", 1)[0] not in DEVICES + (ANY,):
        raise BaselineError(path, f"folder {applies!r} is neither 'any', a device kind ({', '.join(DEVICES)}) nor a "
                                  "device class starting with one")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaselineError(path, f"not valid JSON ({exc})") from exc
    except OSError as exc:
        raise BaselineError(path, f"cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise BaselineError(path, "top level is not a JSON object")
    if data.get("schema") == SCHEMA_V1:
        raise BaselineError(path, f"schema is {SCHEMA_V1!r}, the layout before baseline scopes; this scalellm reads "
                                  f"{SCHEMA!r}: convert the store with `python scripts/migrate_baselines.py "
                                  f"{path.parent.parent}`")
    if data.get("schema") != SCHEMA:
        raise BaselineError(path, f"schema is {data.get('schema')!r}, this scalellm reads {SCHEMA!r}")
    if data.get("applies_to") != applies or data.get("level") != level_of(applies):
        raise BaselineError(path, f"applies to {data.get('level')} {data.get('applies_to')!r} "
                                  f"but is filed under {applies!r} ({level_of(applies)})")
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
    missing = [k for k in ("value", "unit", "better", "environment", "recorded_on") if k not in record]
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

    def path(self, applies: str, test_id: str) -> Path:
        return self.root / applies / f"{file_stem(test_id)}.json"

    def validate_all(self) -> list[Path]:
        """Read every file in the store; raises :class:`BaselineError` on the first bad one (a folder
        name that is no device kind, class or ``any`` too)."""
        paths = sorted(self.root.glob("*/*.json")) if self.root.is_dir() else []
        for path in paths:
            self._read(path, path.parent.name)
        return paths

    def _read(self, path: Path, applies: str) -> dict:
        if path not in self._cache:
            self._cache[path] = read_file(path, applies) if path.exists() else _empty(applies)
        return self._cache[path]

    def get(self, device_class: str, test_id: str, name: str, scope: str = "class") -> Baseline | None:
        """The narrowest stored baseline of the figure ``name`` of ``test_id`` measured on ``device_class``,
        looked up at its class, its kind, then ``any``, never wider than ``scope``."""
        key = test_key(test_id, device_class.split("-", 1)[0])
        for applies in lookup_order(device_class, scope):
            data = self._read(self.path(applies, test_id), applies)
            record = data["metrics"].get(key, {}).get(name)
            if record is not None:
                samples = record.get("samples")
                return Baseline(
                    value=float(record["value"]), unit=record["unit"], better=record["better"],
                    samples=tuple(samples) if samples else None,
                    environment=data["environments"][record["environment"]],
                    applies_to=applies, recorded_on=record["recorded_on"],
                )
        return None

    def orphans(self, collected: dict[str, set[str]]) -> list[Orphan]:
        """The stored entries, in every folder, of the suite modules in ``collected`` ({file stem
        (:func:`file_stem`): the keys (:func:`test_key`) of every test collected from that module})
        whose key is none of those tests'. Files of modules not in ``collected`` are not looked at."""
        found = []
        for path in sorted(self.root.glob("*/*.json")) if self.root.is_dir() else []:
            keys = collected.get(path.stem)
            if keys is None:
                continue
            data = self._read(path, path.parent.name)
            found += [Orphan(path, path.parent.name, key, tuple(sorted(by_name)))
                      for key, by_name in sorted(data["metrics"].items()) if key not in keys]
        return found

    def update(self, device_class: str, metrics: list[Metric], env: dict) -> list[Path]:
        """Store ``metrics`` (measured in ``env`` on ``device_class``), each in the folder its scope
        says; returns the files written."""
        by_path: dict[tuple[Path, str], list[Metric]] = {}
        for metric in metrics:
            applies = applies_to(device_class, metric.scope)
            by_path.setdefault((self.path(applies, metric.test_id), applies), []).append(metric)
        device = device_class.split("-", 1)[0]
        for (path, applies), group in sorted(by_path.items()):
            path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(path):
                data = read_file(path, applies) if path.exists() else _empty(applies)
                env_id = environment.fingerprint_id(env)
                data["environments"][env_id] = env
                for metric in group:
                    record = _record(metric, env_id, device_class)
                    data["metrics"].setdefault(test_key(metric.test_id, device), {})[metric.name] = record
                drop_stored_tolerances(data)  # an older entry's copy goes whenever its file is written
                _drop_unused_environments(data)
                write_atomic(path, _dump(data))
            self._cache.pop(path, None)
        return sorted(path for path, _ in by_path)


    def forget(self, orphans: list[Orphan]) -> list[Path]:
        """Remove the ``orphans`` (:meth:`orphans`) from their files; returns the files written. A file
        left with no entry is removed; no other entry changes."""
        by_path: dict[tuple[Path, str], set[str]] = {}
        for orphan in orphans:
            by_path.setdefault((orphan.path, orphan.applies_to), set()).add(orphan.key)
        for (path, applies), keys in sorted(by_path.items()):
            with _locked(path):
                data = read_file(path, applies)
                for key in keys:
                    data["metrics"].pop(key, None)
                _drop_unused_environments(data)
                if data["metrics"]:
                    write_atomic(path, _dump(data))
                else:
                    path.unlink()
            self._cache.pop(path, None)
        return sorted(path for path, _ in by_path)


def _record(metric: Metric, env_id: str, recorded_on: str) -> dict:
    """A stored entry; the metric's tolerance stays with its test (the module docstring says why)."""
    return {
        "value": metric.value, "unit": metric.unit, "better": metric.better,
        "samples": list(metric.samples) if metric.samples is not None else None,
        "environment": env_id, "recorded_on": recorded_on,
    }


def drop_stored_tolerances(data: dict) -> list[tuple[str, str]]:
    """Remove the ``"tolerance"`` key of every entry of a baseline file's ``data`` (written before the
    store stopped keeping one; the module docstring says why); returns the (test key, metric) of each
    entry that had one. Nothing else of an entry changes."""
    dropped = []
    for key, by_name in data["metrics"].items():
        for name, record in by_name.items():
            if "tolerance" in record:
                del record["tolerance"]
                dropped.append((key, name))
    return dropped


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
