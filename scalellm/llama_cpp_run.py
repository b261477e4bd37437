"""Run a GGUF through llama.cpp (llama-cpp-python): full-vocabulary logits, llama-bench speeds, safe loads.

* :func:`load` opens a model with every layer on the device's GPU (``n_gpu_layers=-1``) or on
  the host's cores (``n_threads = os.cpu_count()``) on cpu.
* :func:`window_logits` evaluates exactly the given token ids (no BOS is added: llama.cpp's
  ``llama_decode`` sees what it is given) and returns the float32 logits of every position;
  :class:`LogitsModel` wraps that in the call shape :mod:`scalellm.quality` expects of a
  transformers model, so llama.cpp is scored by the same code, on the same ids, as every method.
* :func:`prompt_seconds` / :func:`generation_seconds` time one ``pp``/``tg`` run as llama-bench
  does (``tools/llama-bench/llama-bench.cpp``: ``test_prompt`` decodes the prompt in batches of
  ``n_batch`` from an empty cache; ``test_gen`` decodes one token at a time from an empty cache,
  random tokens, ``llama_synchronize`` after each decode).
* :func:`load_checked` is for files that may be damaged: the header walk of
  :func:`scalellm.gguf_file.open_gguf` first, then a trial load by llama.cpp **in a child
  process** (:func:`probe`), so a native abort or a hang in llama.cpp's loader becomes a
  :class:`LlamaCppLoadError` naming the file instead of killing the caller.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from scalellm.gguf_file import GGUFFileError, open_gguf

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
from scalellm import llama_cpp_run
llm = llama_cpp_run.load(sys.argv[1], "cpu", n_ctx=32, extra_buffers=sys.argv[2] == "1", verbose=True)
llm.eval([llm.token_bos()] * {PROBE_TOKENS})
print({PROBE_OK!r}, flush=True)
"""
#: Lines of llama.cpp's log (or of a Python traceback) that say why a load failed.
_REASON = re.compile(r"\b(error|failed|invalid|GGML_ASSERT|exception|aborted)\b", re.IGNORECASE)


class OffloadUnavailable(RuntimeError):
    """The device asks for GPU offload but this llama-cpp-python build has no GPU backend."""


class LlamaCppLoadError(GGUFFileError):
    """llama.cpp could not load a file (its reason, or how its process died); the message starts with the path."""


def gpu_layers(device: str) -> int:
    """``n_gpu_layers`` for ``device``: 0 on cpu, -1 (all layers) on a GPU the build can offload to."""
    import llama_cpp

    if device == "cpu":
        return 0
    if not llama_cpp.llama_supports_gpu_offload():
        raise OffloadUnavailable(f"{device}: this llama-cpp-python build has no GPU offload "
                                 f"(llama_supports_gpu_offload() is False); rebuild it with "
                                 f"CMAKE_ARGS=\"-DGGML_CUDA=on\" (cuda) or on macOS (Metal)")
    return -1


@contextlib.contextmanager
def _model_params(**fields):
    """Set ``llama_model_params`` fields that ``llama_cpp.Llama`` does not expose (``use_extra_bufts``):
    its constructor starts from ``llama_model_default_params()``, so return defaults with them set."""
    import llama_cpp.llama

    lib = llama_cpp.llama.llama_cpp  # the ctypes bindings module Llama calls through
    original = lib.llama_model_default_params

    def defaults():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = defaults
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def load(path: str | os.PathLike, device: str = "cpu", *, logits_all: bool = False, n_ctx: int = N_CTX,
         extra_buffers: bool = True, verbose: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` on ``device``. ``logits_all`` keeps every position's logits
    (for scoring); without it only the last position's are computed (as llama-bench).

    ``extra_buffers=False`` turns off llama.cpp's extra CPU buffer types (``use_extra_bufts``: the
    weight repacks for AMX and for the AVX2/NEON ``CPU_REPACK`` kernels), leaving ggml's plain CPU
    kernels: the way around a build whose AMX kernels die (see :func:`kernel_check`).
    """
    import llama_cpp

    threads = os.cpu_count() or 1
    with _model_params(use_extra_bufts=extra_buffers):
        return llama_cpp.Llama(model_path=str(path), n_gpu_layers=gpu_layers(device), n_ctx=n_ctx, n_batch=n_ctx,
                               n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               verbose=verbose)


def window_logits(llm, ids: list[int]) -> np.ndarray:
    """float32 logits ``(len(ids), vocab)`` of ``ids`` evaluated from an empty cache."""
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit the context of {llm.n_ctx()}")
    llm.reset()  # the next eval drops the cache from position 0 on
    llm.eval(list(ids))
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


class LogitsModel:
    """llama.cpp behind the call shape of a transformers causal LM, for :func:`scalellm.quality.compare`:
    ``model(input_ids=(1, W) tensor).logits`` -> ``(1, W, vocab)`` float32 on the input's device."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, input_ids, use_cache: bool = False):
        import torch

        logits = window_logits(self.llm, input_ids[0].tolist())
        return SimpleNamespace(logits=torch.from_numpy(logits)[None].to(input_ids.device))


def _synchronize(llm) -> None:
    import llama_cpp

    llama_cpp.llama_synchronize(llm.ctx)


def bench_tokens(llm, n: int, seed: int = 0) -> list[int]:
    """Random token ids, as llama-bench feeds (``std::rand() % n_vocab``); seeded here."""
    return np.random.default_rng(seed).integers(0, llm.n_vocab(), n).tolist()


def prompt_seconds(llm, ids: list[int]) -> float:
    """Seconds to decode ``ids`` from an empty cache in batches of ``n_batch`` (llama-bench ``pp``)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    _synchronize(llm)
    return time.perf_counter() - start


def generation_seconds(llm, ids: list[int], budget_s: float = float("inf")) -> float:
    """Seconds to decode ``ids`` one at a time from an empty cache (llama-bench ``tg``).

    Raises ``TimeoutError`` (with the rate reached) once ``budget_s`` is spent: on an oversubscribed
    host ggml's spinning thread barriers can slow single-token steps by orders of magnitude.
    """
    llm.reset()
    start = time.perf_counter()
    for done, token in enumerate(ids, 1):
        llm.eval([token])
        _synchronize(llm)
        elapsed = time.perf_counter() - start
        if elapsed > budget_s and done < len(ids):
            raise TimeoutError(f"{done} of {len(ids)} single-token steps took {elapsed:.1f} s "
                               f"({done / elapsed:.2f} tok/s), over the {budget_s:g} s budget")
    return time.perf_counter() - start


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
    if done.returncode < 0:
        how = f"llama.cpp's process was killed by {signal.Signals(-done.returncode).name}"
    else:
        how = f"llama.cpp's process exited with status {done.returncode}"
    raise LlamaCppLoadError(path, f"{how}: {_reason(done.stderr)}")


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


__all__ = ["LlamaCppLoadError", "LogitsModel", "N_CTX", "OffloadUnavailable", "bench_tokens", "generation_seconds",
           "gpu_layers", "kernel_check", "load", "load_checked", "probe", "prompt_seconds", "window_logits"]
