"""Device classes and availability, on every device present (so `-m cuda` exercises them on a GPU box)."""

from __future__ import annotations

import re

import pytest
import torch

from scalellm import devices, environment


@pytest.mark.parametrize("kind, name, machine, expected", [
    ("cpu", None, "x86_64", "cpu-x86_64"),
    ("cpu", None, "arm64", "cpu-arm64"),
    ("cuda", "NVIDIA H100 80GB HBM3", None, "cuda-nvidia-h100-80gb-hbm3"),
    ("cuda", "NVIDIA GeForce RTX 4090", None, "cuda-nvidia-geforce-rtx-4090"),
    ("mps", "Apple M2 Pro", None, "mps-apple-m2-pro"),
])
def test_device_class_is_derived_from_the_hardware_name(kind, name, machine, expected):
    assert devices.device_class(kind, gpu_name=name, machine=machine) == expected


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        devices.availability("tpu")


def test_the_device_env_override_hides_a_device(monkeypatch):
    monkeypatch.setenv(devices.DEVICES_ENV, "cpu")
    check = devices.availability("cuda")
    assert not check.available and check.reason.startswith("cuda: not in SCALELLM_DEVICES")


def test_this_devices_class_is_a_stable_directory_name(device):
    assert re.fullmatch(rf"{device}-[a-z0-9_-]+", devices.device_class(device))


def test_the_fingerprint_names_this_device(device):
    facts = environment.fingerprint()
    assert facts["torch"] == torch.__version__.split("+")[0] or facts["torch"] == torch.__version__
    if device == "cuda":
        assert facts["gpu"] == torch.cuda.get_device_name(0)


def test_the_seed_fixture_reseeds_this_device(device):
    drawn = torch.rand(8, device=device)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(8, device=device))


def test_a_figure_measured_on_this_device_round_trips_through_a_store(device, tmp_path):
    from scalellm.baselines import BaselineStore, Metric, Tolerance, compare

    value = float(torch.ones(1024, device=device).sum())
    cls = devices.device_class(device)
    metric = Metric(f"suites/harness/test_devices.py::t[{device}]", "sum", value, "1", "equal", Tolerance())
    store = BaselineStore(tmp_path)
    store.update(cls, [metric], environment.fingerprint())
    assert compare(metric, BaselineStore(tmp_path).get(cls, metric.test_id, "sum"), environment.fingerprint()).status \
        == "pass"
