"""Run a measurement in a child process that has never seen the other tests.

Why: torch.cuda's allocator counters (``memory_allocated``, ``max_memory_allocated``) and its cap
(``set_per_process_memory_fraction``) belong to the *process*, and so does the peak resident set
size on CPU. In one pytest process, whatever an earlier test left alive -- a session fixture's
model, a cache, a reference cycle not yet collected -- counts into the next test's peak and eats
into an emulated card's cap. Measured on an H200 with the whole cuda tier in one process: every
QLoRA ceiling case found 853 MB allocated where its model held 594 MB, and GPT-2's inference
prefill peaked at 2.675 GiB where 0.647 GiB was predicted, 2.541 GiB of it held before the prefill;
each file run alone passed. A child started with ``spawn`` is a fresh interpreter: it inherits
``os.environ`` and ``sys.path`` (so it imports this checkout and runs offline, as the parent
does), not the parent's objects, CUDA context or allocator.

The child starts with the environment this process started with (:data:`STARTING_ENVIRON`), not the
one it has by then: a library may change ``os.environ`` when imported, and the child would inherit
the change. gptqmodel 7.6.0 does (``gptqmodel/models/auto.py`` sets ``PYTORCH_ALLOC_CONF`` to
``expandable_segments:True,...`` when it is unset; peft 0.21 imports it whenever it creates a LoRA
model), and the CUDA allocator of every child started after the gptq or lora tier read it. Measured on an H200 (torch 2.11, bnb 0.50.2, 2026-12-03, N=1 each, a
fresh child each): TinyLlama's int8 prefill peaked at 1.429 GB with the starting environment and at
1.366 GB with gptqmodel's setting, moving the planner's error from -4.2% (the H100 baseline: -4.2%)
to +0.25%, beyond its 2-point drift. The test process keeps the library's change (that is what a
user's process gets); the measurement does not. (Not ``fork``: a forked child shares
the parent's pages, which count in its resident set, and cannot use CUDA once the parent has.)

:class:`Worker` wraps a one-process ``concurrent.futures.ProcessPoolExecutor`` (``spawn``):
``worker.run(fn, *args, **kwargs)`` returns ``fn(*args, **kwargs)`` computed in the child, an
exception raised there is raised here as itself (the child's traceback chained as its cause), and
a child that dies -- a signal, a native abort, the out-of-memory killer -- is a :class:`WorkerDied`
naming the function and how the child ended; the next call starts a fresh child.

Cost: one child per :class:`Worker`, reused by every call, so the cases of a test module share one
child as they share one process when the file runs alone: one interpreter start and one
``import torch`` (a few seconds on 2 cores) plus one CUDA context per module, not per case. What a
case leaves alive in the child still counts into the next case of the same module, exactly as in
a run of that file alone; the case functions free what they built before they return.

Rules for what runs in the child:

- ``fn`` is a module-level function of an importable helper module (``suites/helpers/...`` or
  ``scalellm``), never of a test module: the child unpickles it by module and name, and a test
  module would drag pytest's collection-time state into a process that has none;
- its arguments and result are plain, picklable values (names, numbers, dicts);
- it never calls ``pytest.skip``: the parent calls :func:`suites.helpers.packages.need` first.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


#: ``os.environ`` when this module was first imported: by ``suites/conftest.py``, before any test
#: module imports a library.
STARTING_ENVIRON: dict[str, str] = dict(os.environ)


def _start_child(environ: dict[str, str]) -> None:
    """The child's initializer: the starting environment back, before anything reads it (torch's
    allocator reads ``PYTORCH_ALLOC_CONF`` at its first CUDA allocation), and faulthandler on."""
    os.environ.clear()
    os.environ.update(environ)
    # a child dying of a signal prints its Python stack to the (captured) stderr
    faulthandler.enable()


class WorkerDied(RuntimeError):
    """The worker's child process died during a call; the message names the function and how it ended."""


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_runnable(fn) -> None:
    """Refuse what the child cannot import by name, before a child is started for it."""
    module = getattr(fn, "__module__", None) or ""
    if "<" in getattr(fn, "__qualname__", ""):  # <lambda>, <locals>
        raise TypeError(f"{_name(fn)}: a Worker runs module-level functions only (the child imports them by name)")
    if module == "__main__" or module.rsplit(".", 1)[-1].startswith("test_"):
        raise TypeError(f"{_name(fn)}: a Worker runs functions of helper modules, not of a test module or __main__")


def _how(exitcode: int | None) -> str:
    """How a child process ended, from ``multiprocessing.Process.exitcode``."""
    if exitcode is None:
        return "died (its exit status is unknown)"
    if exitcode >= 0:
        return f"exited with status {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    if -exitcode == signal.SIGKILL:
        name += " (the kernel's out-of-memory killer, or a kill -9)"
    return f"was killed by {name}"


class Worker:
    """One reusable ``spawn`` child process that runs module-level functions; see the module docstring.

    The child starts at the first :meth:`run`; :meth:`close` (or leaving a ``with`` block) ends it.
    """

    def __init__(self):
        self._pool: ProcessPoolExecutor | None = None

    def run(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` computed in the child; :class:`WorkerDied` if the child dies doing it."""
        _check_runnable(fn)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_child, initargs=(STARTING_ENVIRON,))
        future = self._pool.submit(fn, *args, **kwargs)
        # The child's multiprocessing.Process, for its exit code should it die. ProcessPoolExecutor
        # keeps its children in ``_processes`` (pid -> Process; CPython 3.9-3.13 at least), filled by submit().
        children = list((getattr(self._pool, "_processes", None) or {}).values())
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._discard()  # joins the dead child, so its exit code is known below
            how = _how(children[0].exitcode) if children else _how(None)
            pid = f" (pid {children[0].pid})" if children else ""
            raise WorkerDied(f"{_name(fn)}: the worker's child process{pid} {how}; "
                             "the next call starts a fresh child") from exc
        finally:
            if not future.done():  # interrupted (Ctrl-C) while the child computes: do not leave it running
                for child in children:
                    child.kill()
                self._discard()

    def _discard(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """End the child (it is idle between calls, so it exits at once); a later :meth:`run` starts a new one."""
        self._discard()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


__all__ = ["Worker", "WorkerDied"]
