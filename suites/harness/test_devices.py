"""Device classes and availability, on every device present (so `-m cuda` exercises them on a GPU box)."""

from __future__ import annotations

import re

import pytest
import torch

from scalellm import devices, environment


@pytest.mark.parametrize("kind, name, expected", [
    ("cuda", "NVIDIA H100 80GB HBM3", "cuda-nvidia-h100-80gb-hbm3"),
    ("cuda", "NVIDIA GeForce RTX 4090", "cuda-nvidia-geforce-rtx-4090"),
    ("mps", "Apple M2 Pro", "mps-apple-m2-pro"),
])
def test_a_gpu_class_is_its_model(kind, name, expected):
    assert devices.device_class(kind, gpu_name=name) == expected


AMX = ["avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"]


@pytest.mark.parametrize("model, flags, cores, machine, expected", [
    ("Intel(R) Xeon(R) Processor", AMX, 2, "x86_64", "cpu-intel-xeon-amx-2c"),
    ("AMD EPYC", ["avx2", "fma", "f16c"], 2, "x86_64", "cpu-amd-epyc-avx2-2c"),
    ("AMD EPYC 9654 96-Core Processor", ["avx2", "avx512f"], 16, "x86_64", "cpu-amd-epyc-9654-96-core-avx512-16c"),
    ("Intel(R) Core(TM) i9-13900K CPU @ 3.00GHz", ["avx2"], 32, "x86_64", "cpu-intel-core-i9-13900k-avx2-32c"),
    ("Intel(R) Xeon(R) Gold 6338", ["avx2", "avx512f", "avx512_bf16"], 8, "x86_64",
     "cpu-intel-xeon-gold-6338-avx512bf16-8c"),
    ("Apple M2 Pro", [], 10, "arm64", "cpu-apple-m2-pro-arm64-10c"),
])
def test_a_cpu_class_is_model_isa_path_and_cores(model, flags, cores, machine, expected):
    assert devices.cpu_class(model, flags, cores, machine) == expected


def test_the_class_override_names_the_class_of_its_device(monkeypatch):
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, "cpu-elsewhere,cuda-my-card")
    assert devices.device_class("cpu") == "cpu-elsewhere"
    assert devices.device_class("cuda", gpu_name="NVIDIA H200") == "cuda-my-card"
    assert devices.device_class("mps", gpu_name="Apple M2") == "mps-apple-m2"


@pytest.mark.parametrize("value", ["elsewhere", "gpu-x", "cpu", "cpu-Upper", "cpu-two words"])
def test_a_malformed_class_override_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(devices.DEVICE_CLASS_ENV, value)
    with pytest.raises(ValueError, match="SCALELLM_DEVICE_CLASS="):
        devices.device_class("cpu")


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        devices.availability("tpu")


def test_the_device_env_override_hides_a_device(monkeypatch):
    monkeypatch.setenv(devices.DEVICES_ENV, "cpu")
    check = devices.availability("cuda")
    assert not check.available and check.reason.startswith("cuda: not in SCALELLM_DEVICES")


def test_this_devices_class_is_a_stable_directory_name(device, monkeypatch):
    monkeypatch.delenv(devices.DEVICE_CLASS_ENV, raising=False)  # the class this hardware gives, not an override
    assert re.fullmatch(rf"{device}-[a-z0-9_-]+", devices.device_class(device))
    if device == "cpu":
        assert devices.device_class(device).endswith(f"-{environment.usable_cores()}c")


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
    for scope in ("class", "kind", "any"):
        metric = Metric(f"suites/harness/test_devices.py::t[{device}]", scope, value, "1", "equal", Tolerance(),
                        scope=scope)
        BaselineStore(tmp_path).update(cls, [metric], environment.fingerprint())
        got = BaselineStore(tmp_path).get(cls, metric.test_id, scope, scope)
        assert got.level == scope and compare(metric, got, environment.fingerprint()).status == "pass"
