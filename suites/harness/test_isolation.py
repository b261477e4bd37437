"""Peaks measured in a child process (``suites/helpers/isolation.py``) cannot see this process's leftovers.

The memory suites measure their peaks through the ``isolated`` fixture because allocator counters and
peak RSS belong to the process: in one pytest process, what earlier tests left alive counted into
every later peak. The first test plants such a leftover here and shows both sides with one function
(``peak_cases.allocation_peak``): measured in the child, the peak is the allocation alone; measured
here, it carries the leftover. The second shows that a change a library makes to this process's
environment after the start does not reach the child. The others hold the :class:`~suites.helpers.isolation.Worker` to its
contract: results and exceptions come back as themselves, one child serves successive calls, and a
child that dies is an error naming the function and the signal, after which a fresh child serves.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from scalellm import memory
from suites.helpers import peak_cases
from suites.helpers.isolation import STARTING_ENVIRON, Worker, WorkerDied

#: What an earlier test leaves alive in this process, and what the measured case allocates.
LEFTOVER_BYTES = 256 << 20
ALLOCATION_BYTES = 64 << 20


def leftover(device: str):
    """``LEFTOVER_BYTES`` held on ``device``; on cpu written, so resident (``np.zeros`` would not be)."""
    if device == "cpu":
        return np.ones(LEFTOVER_BYTES, dtype=np.uint8)
    import torch

    return torch.ones(LEFTOVER_BYTES, dtype=torch.uint8, device=device)


# mps has no peak counter to reset (``scalellm.memory.peak_bytes`` reads the current driver allocation)
@pytest.mark.memory
@pytest.mark.devices("cpu", "cuda")
def test_a_leftover_here_is_not_in_a_peak_measured_in_the_child(device, isolated):
    if device == "cpu" and not memory.rss_peak_resettable():
        pytest.skip("this OS cannot reset the peak RSS (no /proc/self/clear_refs): a cpu peak here is the "
                    "process's lifetime high-water mark")
    kept = leftover(device)
    child = isolated.run(peak_cases.allocation_peak, device, ALLOCATION_BYTES)
    here = peak_cases.allocation_peak(device, ALLOCATION_BYTES)
    del kept
    with_leftover = LEFTOVER_BYTES + ALLOCATION_BYTES
    assert ALLOCATION_BYTES <= child["peak"] < with_leftover, (
        f"{device}: the child's peak {child['peak']} bytes (from {child['before']} at the reset) sees more than "
        f"the {ALLOCATION_BYTES}-byte allocation and its own interpreter: the parent's {LEFTOVER_BYTES}-byte "
        "leftover reached it")
    # the contrast: the same measurement in this process carries the leftover
    assert here["peak"] >= with_leftover, (
        f"{device}: measured in this process, the peak {here['peak']} bytes should include the "
        f"{LEFTOVER_BYTES}-byte leftover and the {ALLOCATION_BYTES}-byte allocation")


def test_a_change_to_the_environment_after_start_does_not_reach_the_child(monkeypatch):
    """What gptqmodel's import does (sets ``PYTORCH_ALLOC_CONF``), done here by hand: the child
    starts with the environment the session started with."""
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("SCALELLM_SET_BY_A_LIBRARY", "1")
    with Worker() as worker:
        assert worker.run(os.getenv, "PYTORCH_ALLOC_CONF") == STARTING_ENVIRON.get("PYTORCH_ALLOC_CONF")
        assert worker.run(os.getenv, "SCALELLM_SET_BY_A_LIBRARY") is None
        assert worker.run(os.getenv, "PATH") == STARTING_ENVIRON["PATH"]  # the rest is there


# ---------------------------------------------------------------- the Worker's contract (builtins: no import cost)


def test_results_come_back_from_one_reused_child():
    with Worker() as worker:
        assert worker.run(divmod, 7, 2) == (3, 1)
        assert worker.run(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]  # keyword arguments too
        child = worker.run(os.getpid)
        assert child != os.getpid()
        assert worker.run(os.getpid) == child


def test_an_exception_in_the_child_is_raised_here_as_itself():
    with Worker() as worker:
        child = worker.run(os.getpid)
        with pytest.raises(ValueError, match=re.escape("invalid literal for int() with base 10: 'twelve'")):
            worker.run(int, "twelve")
        assert worker.run(int, "12") == 12
        assert worker.run(os.getpid) == child  # an exception does not cost the child


def test_a_child_that_dies_is_an_error_naming_function_and_signal_then_a_fresh_child_serves():
    """What a segfault or a native abort in a library does to the child, done by ``os.abort``."""
    with Worker() as worker:
        first = worker.run(os.getpid)
        with pytest.raises(WorkerDied, match=rf"^{re.escape(os.abort.__module__)}\.abort: the worker's child "
                                             rf"process \(pid {first}\) was killed by SIGABRT"):
            worker.run(os.abort)
        second = worker.run(os.getpid)
        assert second not in (first, os.getpid())


def _local_function():
    return 1


def test_what_the_child_cannot_import_by_name_is_refused_before_it_starts():
    worker = Worker()
    with pytest.raises(TypeError, match="module-level functions only"):
        worker.run(lambda: 1)
    with pytest.raises(TypeError, match="not of a test module"):
        worker.run(_local_function)
    assert worker._pool is None  # no child was started for them
