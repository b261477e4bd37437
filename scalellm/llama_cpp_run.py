"""Run a GGUF through llama.cpp (llama-cpp-python): full-vocabulary logits, llama-bench speeds, safe loads.

Every model lives in a **worker process that never imports torch** (:mod:`scalellm.llama_cpp_worker`,
started with ``python -m``; its module docstring has the measurement): on the lent H100 (torch
2.11+cu130, llama-cpp-python 0.3.36 with ``GGML_CUDA=on``) llama.cpp's CUDA build and torch's CUDA
cannot share a process (SIGSEGV at model load after torch touched CUDA; an abort inside torch's
import when llama_cpp came first), and pytest imports torch. The worker is used on every device,
cpu included, so one code path is tested everywhere and a native crash in llama.cpp becomes a
:class:`LlamaCppWorkerError` naming the file and the signal instead of killing the caller.

* :func:`load` starts a worker that opens a model with every layer on the device's GPU
  (``n_gpu_layers=-1``) or on the host's cores (``n_threads`` = the cores the process may use) on cpu; it returns
  a :class:`Worker`, closed by ``close()``, by garbage collection or at interpreter exit.
* :func:`window_logits` evaluates exactly the given token ids (no BOS is added: llama.cpp's
  ``llama_decode`` sees what it is given) and returns the float32 logits of every position;
  :class:`LogitsModel` wraps that in the call shape :mod:`scalellm.quality` expects of a
  transformers model, so llama.cpp is scored by the same code, on the same ids, as every method.
* :func:`prompt_seconds` / :func:`generation_seconds` time one ``pp``/``tg`` run as llama-bench
  does (``tools/llama-bench/llama-bench.cpp``: ``test_prompt`` decodes the prompt in batches of
  ``n_batch`` from an empty cache; ``test_gen`` decodes one token at a time from an empty cache,
  random tokens, ``llama_synchronize`` after each decode). The clock runs inside the worker,
  around the decode: the pipe never enters a figure.
* :func:`load_checked` is for files that may be damaged: the header walk of
  :func:`scalellm.gguf_file.open_gguf` first, then a trial load by llama.cpp **in a child
  process** (:func:`probe`), so a native abort or a hang in llama.cpp's loader becomes a
  :class:`LlamaCppLoadError` naming the file instead of killing the caller.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from scalellm.gguf_file import GGUFFileError, open_gguf
from scalellm.llama_cpp_worker import OffloadUnavailable, gpu_layers, read_frame, write_frame

#: Context of the scoring and speed runs: one quality window, llama-bench's pp512.
N_CTX = 512
#: The child's own limit for a trial load (the real model loads in ~0.2 s).
PROBE_TIMEOUT_S = 120
PROBE_OK = "scalellm-probe: ok"
#: Tokens the child decodes in one batch: a batch > 1 takes the quantized matmul kernels the scoring
#: runs use (a single token takes the vector path).
PROBE_TOKENS = 16
#: The child: load the file as :func:`load` does, decode a batch, say so. Its stderr carries
#: llama.cpp's log. argv: path, extra_buffers (0/1).
PROBE_SCRIPT = f"""
import sys
from scalellm import llama_cpp_worker
llm = llama_cpp_worker.open_model(sys.argv[1], "cpu", n_ctx=32, extra_buffers=sys.argv[2] == "1", verbose=True)
llm.eval([llm.token_bos()] * {PROBE_TOKENS})
print({PROBE_OK!r}, flush=True)
"""
#: How long a closed worker may take to free its model and exit before it is killed.
CLOSE_TIMEOUT_S = 10
#: Lines of llama.cpp's log (or of a Python traceback) that say why a load failed.
_REASON = re.compile(r"\b(error|failed|invalid|GGML_ASSERT|exception|aborted)\b", re.IGNORECASE)


class LlamaCppLoadError(GGUFFileError):
    """llama.cpp could not load a file (its reason, or how its process died); the message starts with the path."""


class LlamaCppWorkerError(RuntimeError):
    """A worker died (a signal, a native abort) or stopped answering; the message starts with the path."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{self.path}: {problem}")


def _how(returncode: int | None) -> str:
    if returncode is None:
        return "llama.cpp's process stopped answering"
    if returncode < 0:
        return f"llama.cpp's process was killed by {signal.Signals(-returncode).name}"
    return f"llama.cpp's process exited with status {returncode}"


def _stop(proc: subprocess.Popen, stderr) -> None:
    """Kill the worker if it still runs, reap it, drop its pipes and log (a ``weakref.finalize`` callback)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, stderr):
        try:
            stream.close()
        except OSError:
            pass


class Worker:
    """One GGUF model opened by :func:`scalellm.llama_cpp_worker.open_model` in a ``python -m
    scalellm.llama_cpp_worker`` process; :func:`load` makes one. Its stderr (llama.cpp's log) goes
    to a temporary file, read for the reason when the worker dies."""

    def __init__(self, path: str | os.PathLike, **params):
        self.path = Path(path)
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "scalellm.llama_cpp_worker"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._log)
        try:
            self._info = self._exchange({"path": str(self.path), **params}, "load")
        except LlamaCppWorkerError as exc:
            self.close()
            raise LlamaCppLoadError(self.path, exc.problem) from None
        except OffloadUnavailable:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise LlamaCppLoadError(self.path, f"{type(exc).__name__}: {exc}") from None

    @property
    def pid(self) -> int:
        return self._proc.pid

    def n_vocab(self) -> int:
        return self._info["n_vocab"]

    def n_ctx(self) -> int:
        return self._info["n_ctx"]

    def token_bos(self) -> int:
        return self._info["bos"]

    def call(self, request: str, *args):
        """The worker's answer to ``request(*args)`` (:data:`scalellm.llama_cpp_worker.REQUESTS`);
        its exception re-raised here, or :class:`LlamaCppWorkerError` if it died."""
        return self._exchange((request, args), request)

    def _exchange(self, message, what: str):
        if not self._finalizer.alive:
            raise LlamaCppWorkerError(self.path, f"{what}: the worker is closed")
        try:
            write_frame(self._proc.stdin, message)
            status, value = read_frame(self._proc.stdout)
        except (EOFError, BrokenPipeError, OSError):
            raise self._died(what) from None
        if status == "err":
            raise value
        return value

    def _died(self, what: str) -> LlamaCppWorkerError:
        try:
            self._proc.wait(timeout=CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        self._log.seek(0)
        reason = _reason(self._log.read().decode("utf-8", "replace"))
        error = LlamaCppWorkerError(self.path, f"{_how(self._proc.poll())} during {what}: {reason}")
        self._finalizer()
        return error

    def close(self) -> None:
        """Ask the worker to free its model and exit; kill it if it does not within CLOSE_TIMEOUT_S."""
        if not self._finalizer.alive:
            return
        try:
            write_frame(self._proc.stdin, ("close", ()))
            self._proc.wait(timeout=CLOSE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def load(path: str | os.PathLike, device: str = "cpu", *, logits_all: bool = False, n_ctx: int = N_CTX,
         n_threads: int | None = None, kv_type: str | None = None, extra_buffers: bool = True,
         verbose: bool = False) -> Worker:
    """A :class:`Worker` holding ``path`` on ``device``. ``logits_all`` keeps every position's logits
    (for scoring); without it only the last position's are computed (as llama-bench). ``n_threads``
    defaults to the cores the process may use; ``kv_type="F32"`` keeps the KV cache in float32 (llama.cpp's
    default is F16).

    ``extra_buffers=False`` turns off llama.cpp's extra CPU buffer types (``use_extra_bufts``: the
    weight repacks for AMX and for the AVX2/NEON ``CPU_REPACK`` kernels), leaving ggml's plain CPU
    kernels: the way around a build whose AMX kernels die (see :func:`kernel_check`).

    Raises :class:`OffloadUnavailable` when ``device`` is a GPU this build cannot offload to, and
    :class:`LlamaCppLoadError` when llama.cpp cannot open the file (or its process dies trying).
    """
    return Worker(path, device=device, logits_all=logits_all, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type,
                  extra_buffers=extra_buffers, verbose=verbose)


def window_logits(llm: Worker, ids: list[int]) -> np.ndarray:
    """float32 logits ``(len(ids), vocab)`` of ``ids`` evaluated from an empty cache."""
    return llm.call("window_logits", [int(i) for i in ids])


def greedy(llm: Worker, ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """Greedy decoding in llama.cpp (argmax of the last logits) from ``ids``, stopping after ``eos`` as
    :func:`scalellm.generate.greedy` does; the new token ids."""
    return llm.call("greedy", [int(i) for i in ids], int(max_new_tokens), eos)


class LogitsModel:
    """llama.cpp behind the call shape of a transformers causal LM, for :func:`scalellm.quality.compare`:
    ``model(input_ids=(1, W) tensor).logits`` -> ``(1, W, vocab)`` float32 on the input's device."""

    def __init__(self, llm: Worker):
        self.llm = llm

    def __call__(self, input_ids, use_cache: bool = False):
        import torch

        logits = window_logits(self.llm, input_ids[0].tolist())
        return SimpleNamespace(logits=torch.from_numpy(logits)[None].to(input_ids.device))


def bench_tokens(llm: Worker, n: int, seed: int = 0) -> list[int]:
    """Random token ids, as llama-bench feeds (``std::rand() % n_vocab``); seeded here."""
    return np.random.default_rng(seed).integers(0, llm.n_vocab(), n).tolist()


def prompt_seconds(llm: Worker, ids: list[int]) -> float:
    """Seconds to decode ``ids`` from an empty cache in batches of ``n_batch`` (llama-bench ``pp``),
    clocked in the worker."""
    return llm.call("prompt_seconds", [int(i) for i in ids])


def generation_seconds(llm: Worker, ids: list[int], budget_s: float = float("inf")) -> float:
    """Seconds to decode ``ids`` one at a time from an empty cache (llama-bench ``tg``), clocked in the worker.

    Raises ``TimeoutError`` (with the rate reached) once ``budget_s`` is spent: on an oversubscribed
    host ggml's spinning thread barriers can slow single-token steps by orders of magnitude.
    """
    return llm.call("generation_seconds", [int(i) for i in ids], float(budget_s))


#: The child of :func:`requantize`: ``llama_cpp_quantize.requantize_file(src, dst, ftype_name)``.
REQUANTIZE_SCRIPT = "import sys; from scalellm import llama_cpp_quantize as q; q.requantize_file(*sys.argv[1:4])"
#: A requantization of the real model takes under a second (docs/evidence.md: llama.cpp requantization);
#: this only bounds a hang.
REQUANTIZE_TIMEOUT_S = 600


def requantize(src: str | os.PathLike, dst: str | os.PathLike, ftype_name: str) -> Path:
    """:func:`scalellm.llama_cpp_quantize.requantize_file` run in a torch-free child process, for the
    same reason as the worker; :class:`LlamaCppWorkerError` naming ``src`` if the child fails."""
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", REQUANTIZE_SCRIPT, str(src), str(dst),
                               ftype_name], capture_output=True, text=True, errors="replace",
                              timeout=REQUANTIZE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LlamaCppWorkerError(src, f"requantizing to {ftype_name} took over {REQUANTIZE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise LlamaCppWorkerError(src, f"{_how(done.returncode)} requantizing to {ftype_name}: "
                                       f"{_reason(done.stderr)}")
    return Path(dst)


# ---------------------------------------------------------------- damaged files


def _reason(stderr: str) -> str:
    """The first line of the child's stderr that names a failure, else its last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if _REASON.search(line):
            return line[:400]
    return lines[-1][:400] if lines else "no message"


def probe(path: str | os.PathLike, *, extra_buffers: bool = True, timeout: float = PROBE_TIMEOUT_S,
          script: str = PROBE_SCRIPT) -> None:
    """Load ``path`` with llama.cpp and decode a batch in a child Python process;
    :class:`LlamaCppLoadError` naming the file if that fails.

    ``script`` runs as ``python -c script path extra_buffers`` and must print :data:`PROBE_OK`.
    """
    path = Path(path)
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script, str(path), str(int(extra_buffers))],
                              capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppLoadError(path, f"llama.cpp did not finish loading it within {timeout:g} s") from None
    if done.returncode == 0 and PROBE_OK in done.stdout:
        return
    raise LlamaCppLoadError(path, f"{_how(done.returncode)}: {_reason(done.stderr)}")


def load_checked(path: str | os.PathLike, device: str = "cpu", **kwargs):
    """:func:`load` after :func:`scalellm.gguf_file.open_gguf` and :func:`probe` accepted the file.

    Raises :class:`~scalellm.gguf_file.GGUFFileError` (a damaged header or truncated data) or
    :class:`LlamaCppLoadError` (llama.cpp refused it, or died trying), each naming the file.
    """
    open_gguf(path)
    probe(path, extra_buffers=kwargs.get("extra_buffers", True))
    return load(path, device, **kwargs)


def kernel_check(path: str | os.PathLike) -> tuple[bool, str]:
    """Which CPU kernels of this build run ``path`` without killing the process, tried in a child.

    Returns ``(True, "")`` when llama.cpp's default kernels (extra buffers on) run it, else
    ``(False, why)`` when only the plain kernels do (``why``: how the default ones died). Raises
    :class:`LlamaCppLoadError` when neither does.
    """
    try:
        probe(path, extra_buffers=True)
        return True, ""
    except LlamaCppLoadError as exc:
        probe(path, extra_buffers=False)
        return False, exc.problem


__all__ = ["LlamaCppLoadError", "LlamaCppWorkerError", "LogitsModel", "N_CTX", "OffloadUnavailable", "Worker",
           "bench_tokens", "generation_seconds", "gpu_layers", "greedy", "kernel_check", "load", "load_checked", "probe",
           "prompt_seconds", "requantize", "window_logits"]
