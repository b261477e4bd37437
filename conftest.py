"""Root conftest: the device parametrization, gating, and the metric fixture.

Configuration flows one way: command line and markers -> these fixtures -> suites -> scalellm.
"""

from __future__ import annotations

import gc
import os
import random

# Offline by construction: set before transformers or huggingface_hub is imported anywhere, so no
# test can reach a hub (their constants are read at import time).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from scalellm import devices, results  # noqa: E402
from scalellm.baselines import LEVELS, BaselineError, BaselineStore, Metric, Tolerance  # noqa: E402
from suites.helpers import crashes, support  # noqa: E402
from suites.helpers.recorder import MetricRecorder  # noqa: E402

# pytester: the harness self-tests run small suites through this conftest. scalellm_pytest: the options
# (--baseline-dir, --report-dir, --update-baselines, --require-device, --model), also the installed
# pytest11 entry point, which makes them work with paths outside the checkout (its docstring says how).
pytest_plugins = ("pytester", "scalellm_pytest")

DEVICE_MARKERS = results.DEVICE_MARKERS

# Hypothesis: "dev" for local runs; "ci" (derandomized, no example database) when CI is set;
# "nightly" for the long job. Deadlines are off: first calls into torch/bnb are slow to warm up.
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True, database=None,
                          print_blob=True)
settings.register_profile("nightly", parent=settings.get_profile("dev"), max_examples=400)
settings.load_profile(os.environ.get("SCALELLM_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    root = config.rootpath
    store = BaselineStore(config.getoption("--baseline-dir") or root / "baselines")
    try:
        store.validate_all()
    except BaselineError as exc:
        raise pytest.UsageError(f"bad baseline file: {exc}") from exc
    try:
        for device in devices.DEVICES:
            devices.class_override(device)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from exc
    levels = tuple(v.strip() for v in config.getoption("--update-levels").split(","))
    if set(levels) - set(LEVELS):
        raise pytest.UsageError(f"--update-levels {','.join(levels)}: expected a comma list of {', '.join(LEVELS)}")
    recorder = MetricRecorder(store, update=config.getoption("--update-baselines"),
                              report_dir=config.getoption("--report-dir"), update_levels=levels)
    config.pluginmanager.register(recorder, "scalellm-recorder")
    config.stash[RECORDER] = recorder
    crashes.register(config)


RECORDER = pytest.StashKey[MetricRecorder]()


# ---------------------------------------------------------------- devices


def pytest_generate_tests(metafunc):
    """Run every test that takes ``device`` once per device, marked with that device's marker."""
    if "device" not in metafunc.fixturenames:
        return
    only = metafunc.definition.get_closest_marker("devices")
    names = only.args if only else devices.DEVICES
    unknown = set(names) - set(devices.DEVICES)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: devices() names unknown {sorted(unknown)}")
    metafunc.parametrize("device", [pytest.param(d, marks=getattr(pytest.mark, d), id=d) for d in names])


def pytest_collection_modifyitems(config, items):
    """Device-free tests run on the host: they carry the ``cpu`` marker so ``-m cpu`` selects them."""
    for item in items:
        if not any(item.get_closest_marker(m) for m in DEVICE_MARKERS):
            item.add_marker(pytest.mark.cpu)


def pytest_runtest_setup(item):
    """Skip (or, with --require-device, fail) cases whose device is absent, with one clear reason."""
    checks = []
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "device" in callspec.params:
        checks.append(devices.availability(callspec.params["device"]))
    if item.get_closest_marker("multigpu"):
        checks.append(devices.multigpu_availability())
    for check in checks:
        if not check.available:
            if item.config.getoption("--require-device"):
                pytest.fail(f"--require-device: {check.reason}", pytrace=False)
            pytest.skip(check.reason)


def pytest_report_header(config):
    """Before the run: installed releases too old to have kernels for a device (suites/helpers/support.py)."""
    return support.header_lines()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a library release older than its first kernels for the test's device
    is reported ``unsupported``, not failed (suites/helpers/support.py says exactly when)."""
    report = yield
    support.mark_unsupported(item, call, report)
    return report


def pytest_sessionfinish(session, exitstatus):
    """``pytest -m cuda`` on a machine with no cuda case collected is not a failure of the nightly job."""
    expr = session.config.getoption("markexpr") or ""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and any(d in expr for d in DEVICE_MARKERS):
        session.exitstatus = pytest.ExitCode.OK


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def seed():
    """Reseed every generator before each test; release cached device memory after it."""
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield 0
    # gc.collect() costs 0.1-0.4 s per test once torch and bnb are imported (hundreds of thousands of
    # objects); host memory is freed by reference counting, so collect only to release device caches.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        gc.collect()
        mps.empty_cache()


@pytest.fixture
def record_metric(request):
    """``record_metric(name, value, *, unit, better, tolerance, samples=None)``: report a figure.

    It is compared with the stored baseline for this test on this test's device class; a figure
    outside its tolerance fails the test (after the test body ends, so every figure is recorded).
    """
    recorder = request.config.stash[RECORDER]
    device = support.device_of(request.node)

    def record(name: str, value: float, *, unit: str, better: str, tolerance: Tolerance,
               samples=None) -> None:
        if samples is not None:
            samples = tuple(float(s) for s in samples)
        metric = Metric(request.node.nodeid, name, float(value), unit, better, tolerance, samples)
        recorder.record(request.node, device, metric)

    return record


@pytest.fixture(scope="session")
def model_path(request):
    """A user's local checkpoint given with --model, or None for the shipped SmolLM2 fixture."""
    return request.config.getoption("model_path")


@pytest.fixture(scope="session")
def checkpoint(model_path):
    """The real model as a :class:`scalellm.models.Checkpoint`: ``--model PATH`` or the converted
    SmolLM2 (converted once, cached); skips with the install hint when the package is missing."""
    from scalellm import models
    from suites.helpers.packages import need

    need("transformers")
    try:
        return models.resolve_checkpoint(model_path)
    except models.ModelNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def tokenizer(checkpoint):
    """The real model's tokenizer, from its local directory."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint.path, local_files_only=True)
