"""The ``unsupported`` verdict (suites/helpers/support.py): a stand-in bitsandbytes, installed as an
old or a new release, decides whether a failure counts as unsupported or stays a failure."""

from __future__ import annotations

import os

import pytest

#: A stand-in for bitsandbytes: its CPU quantizer raises, its CPU layer returns zeros without raising.
FAKE_BNB = '''
import numpy as np

def quantize_4bit(x):
    raise NotImplementedError("Device type not supported for FP4 quantization: cpu")

def linear_forward(x):
    return np.zeros_like(x)
'''

TESTS = '''
import numpy as np
import pytest

@pytest.mark.devices("cpu")
def test_raises_inside_the_library(device):
    import bitsandbytes
    bitsandbytes.quantize_4bit(np.ones(4))

@pytest.mark.nf4
@pytest.mark.devices("cpu")
def test_method_test_gets_a_wrong_result(device):
    import bitsandbytes
    assert bitsandbytes.linear_forward(np.ones(4)).sum() == 4, "the layer did not compute"

@pytest.mark.devices("cpu")
def test_fails_on_its_own(device):
    assert 1 == 2, "a failure of the suite's own code"
'''


def fake_transformers(minimum: str) -> dict[str, str]:
    """A stand-in for transformers: it declares ``minimum`` for bitsandbytes where transformers 5 does,
    and its quantizer refuses an older bitsandbytes with transformers' own message."""
    return {
        "__init__.py": "",
        "utils/__init__.py": "",
        "utils/import_utils.py": f'BITSANDBYTES_MIN_VERSION = "{minimum}"\n',
        "quantizer.py": (
            "def quantize():\n"
            "    raise ImportError('Using `bitsandbytes` 4-bit quantization requires bitsandbytes: '\n"
            "                      '`pip install -U bitsandbytes>=0.46.1`')\n"),
    }


MINIMUM_TESTS = '''
import pytest

@pytest.mark.devices("cpu")
def test_transformers_refuses_the_release(device):
    from transformers import quantizer
    quantizer.quantize()

@pytest.mark.devices("cpu")
def test_fails_on_its_own(device):
    assert 1 == 2, "a failure of the suite's own code"
'''


def install_package(site, name: str, version: str, files: dict[str, str]) -> None:
    """``files`` as package ``name`` ``version`` (package and dist-info) under ``site``."""
    for relative, text in files.items():
        (site / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / name / relative).write_text(text)
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def install_fake(root, version: str, transformers_minimum: str | None) -> str:
    """A folder holding the stand-in as bitsandbytes ``version`` and, unless ``transformers_minimum`` is
    None, the stand-in transformers declaring that minimum, for PYTHONPATH."""
    site = root / "fake-site"
    install_package(site, "bitsandbytes", version, {"__init__.py": FAKE_BNB})
    if transformers_minimum is not None:
        install_package(site, "transformers", "9.0.0", fake_transformers(transformers_minimum))
    return str(site)


def run_with_release(suite, monkeypatch, version: str, *, tests: str = TESTS, transformers_minimum: str | None = None):
    site = install_fake(suite.pytester.path, version, transformers_minimum)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]))
    suite.write("test_demo.py", tests)
    return suite.run("-rsf", "-m", "cpu", "--report-dir", str(suite.pytester.path / "report"))


def test_a_release_older_than_its_cpu_kernels_is_named_before_the_run(suite, monkeypatch):
    result = run_with_release(suite, monkeypatch, "0.45.4")
    result.stdout.fnmatch_lines(["stack: bitsandbytes 0.45.4 predates its cpu kernels (first in 0.46.0): cpu tests "
                                 "that fail using bitsandbytes are reported unsupported"])


def test_with_an_old_release_a_failure_from_the_library_is_unsupported_and_the_suites_own_still_fails(
        suite, monkeypatch):
    result = run_with_release(suite, monkeypatch, "0.45.4")
    result.assert_outcomes(failed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "*unsupported: bitsandbytes 0.45.4 predates its cpu kernels (first in 0.46.0); it raised NotImplementedError: "
        "Device type not supported for FP4 quantization: cpu*",
        "*unsupported: bitsandbytes 0.45.4 predates its cpu kernels (first in 0.46.0); it raised AssertionError: "
        "the layer did not compute*",
        "FAILED *test_fails_on_its_own*"])
    result.stdout.fnmatch_lines(["2 test(s) unsupported, not failed: bitsandbytes 0.45.4 predates its cpu kernels "
                                 "(first in 0.46.0)"])
    summary = (suite.pytester.path / "report" / "summary.md").read_text()
    assert "Tests: 1 failed, 2 unsupported" in summary and "## Unsupported" in summary


@pytest.mark.parametrize("version", ["0.46.0", "0.50.2"])
def test_with_a_release_that_has_the_kernels_every_failure_is_a_failure(suite, monkeypatch, version):
    # a transformers that declares no minimum above it: only the kernels rule is in play
    result = run_with_release(suite, monkeypatch, version, transformers_minimum="0.43.0")
    result.assert_outcomes(failed=3)
    assert "unsupported" not in result.stdout.str()



def test_a_release_below_a_minimum_another_library_declares_is_named_and_its_refusal_is_unsupported(
        suite, monkeypatch):
    result = run_with_release(suite, monkeypatch, "0.46.0", tests=MINIMUM_TESTS, transformers_minimum="0.46.1")
    result.stdout.fnmatch_lines(["stack: transformers 9.0.0 requires bitsandbytes >= 0.46.1; 0.46.0 is installed: "
                                 "tests that fail using bitsandbytes are reported unsupported"])
    result.assert_outcomes(failed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*unsupported: transformers 9.0.0 requires bitsandbytes >= 0.46.1; 0.46.0 is installed; it raised "
        "ImportError: Using `bitsandbytes` 4-bit quantization requires bitsandbytes*",
        "FAILED *test_fails_on_its_own*"])


def test_at_the_declared_minimum_the_refusal_is_a_failure(suite, monkeypatch):
    result = run_with_release(suite, monkeypatch, "0.46.1", tests=MINIMUM_TESTS, transformers_minimum="0.46.1")
    result.assert_outcomes(failed=2)
    assert "unsupported" not in result.stdout.str()
