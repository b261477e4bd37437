"""The llama.cpp side of :mod:`scalellm.llama_cpp_run`: one GGUF model served from a process that never imports torch.

Why a separate process: measured on the lent H100 (torch 2.11+cu130, llama-cpp-python 0.3.36 built
with ``GGML_CUDA=on``), llama.cpp's CUDA build and torch's CUDA cannot share a process --
``import torch, llama_cpp; torch.zeros(1).cuda(); llama_cpp.Llama(path, n_gpu_layers=-1)`` dies with
SIGSEGV at model load, ``import llama_cpp, torch`` aborts inside torch's import, and neither OpenMP
off nor ``LD_LIBRARY_PATH`` at torch's CUDA libraries changes that; a process that never imports
torch loads the model with every layer on the GPU and generates " Paris.", provided ``llama_cpp`` is
imported before numpy (numpy first: the same SIGSEGV at every GPU load). So this module imports only
``llama_cpp`` (first, when installed), numpy and the standard library; ``scalellm/__init__`` imports
nothing.

Run as ``python -m scalellm.llama_cpp_worker``: the first frame on stdin is the keyword arguments of
:func:`open_model`; the worker answers ``("ok", info)`` or ``("err", exception)``, then serves
``(request, args)`` frames (:data:`REQUESTS`) until ``("close", ())`` or the end of stdin (its
parent gone). A frame is an 8-byte little-endian length and a pickle. The clock of every timing is
read here, around the decode, so the pipe never enters a figure.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import sys
import time

try:
    # Before numpy: on the H100 (llama-cpp-python 0.3.36 CUDA build, numpy 2.5) importing numpy first
    # made every GPU model load die with SIGSEGV; llama_cpp first, it runs. (Measured 2026-11-26.)
    import llama_cpp as _llama_cpp_first  # noqa: F401
except ImportError:  # reported by open_model, where a model is asked for
    pass

import numpy as np

from scalellm.environment import usable_cores  # the standard library only: keeps the import order

#: Frame header: the pickle's length in bytes.
_LENGTH = struct.Struct("<Q")
#: What a parent may ask (methods of :class:`Runner`); ``close`` ends the worker.
REQUESTS = ("window_logits", "prompt_seconds", "generation_seconds", "greedy")
#: KV cache types by name (``type_k``/``type_v`` of ``llama_context_params``; llama.cpp's default is F16).
KV_TYPES = ("F32", "F16", "Q8_0")


class OffloadUnavailable(RuntimeError):
    """The device asks for GPU offload but this llama-cpp-python build has no GPU backend."""


# ---------------------------------------------------------------- frames


def write_frame(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_LENGTH.pack(len(data)))
    stream.write(data)
    stream.flush()


def read_frame(stream):
    """The next object on ``stream``; ``EOFError`` when it ends (mid-frame included)."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        raise EOFError("the stream ended")
    (n,) = _LENGTH.unpack(head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError(f"the stream ended {len(data)} bytes into a {n}-byte frame")
    return pickle.loads(data)


def _sendable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip (TimeoutError, ValueError, OffloadUnavailable...), else
    a RuntimeError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- llama.cpp in this process


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


def open_model(path: str, device: str = "cpu", *, logits_all: bool = False, n_ctx: int = 512,
               n_threads: int | None = None, kv_type: str | None = None, extra_buffers: bool = True,
               verbose: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` in this process: every layer on the device's GPU
    (``n_gpu_layers=-1``) or none on cpu; batches of ``n_ctx``; ``n_threads`` (default
    ``usable_cores()``) for single-token and batch decodes; a ``kv_type`` (:data:`KV_TYPES`) K and V
    cache, else llama.cpp's default (F16); ``extra_buffers=False`` turns off ``use_extra_bufts``."""
    import llama_cpp

    threads = n_threads or usable_cores()
    cache = {}
    if kv_type is not None:
        if kv_type not in KV_TYPES:
            raise ValueError(f"kv_type {kv_type!r} is not one of {KV_TYPES}")
        cache = {"type_k": getattr(llama_cpp, f"GGML_TYPE_{kv_type}"), "type_v": getattr(llama_cpp, f"GGML_TYPE_{kv_type}")}
    # Patch the defaults only to turn the extra buffer types off: on the H100 (CUDA build) any load
    # through the patched llama_model_default_params died with SIGSEGV, the unpatched one runs.
    with _model_params(use_extra_bufts=False) if not extra_buffers else contextlib.nullcontext():
        return llama_cpp.Llama(model_path=str(path), n_gpu_layers=gpu_layers(device), n_ctx=n_ctx, n_batch=n_ctx,
                               n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all,
                               verbose=verbose, **cache)


class Runner:
    """The requests a worker serves, on one ``llama_cpp.Llama``; each starts from an empty cache."""

    def __init__(self, llm, logits_all: bool):
        self.llm, self.logits_all = llm, logits_all

    def info(self) -> dict:
        return {"n_vocab": self.llm.n_vocab(), "n_ctx": self.llm.n_ctx(), "bos": self.llm.token_bos()}

    def _need_logits(self, request: str) -> None:
        """llama-cpp-python 0.3.36's ``Llama.eval`` copies logits into ``scores`` only with ``logits_all``
        (otherwise ``scores`` stays zero), so the requests that read logits need it."""
        if not self.logits_all:
            raise ValueError(f"{request} reads logits: open the model with logits_all=True")

    def _synchronize(self) -> None:
        import llama_cpp

        llama_cpp.llama_synchronize(self.llm.ctx)

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits ``(len(ids), vocab)`` of exactly ``ids`` (no BOS added: ``llama_decode`` sees
        what it is given)."""
        self._need_logits("window_logits")
        if len(ids) > self.llm.n_ctx():
            raise ValueError(f"{len(ids)} tokens do not fit the context of {self.llm.n_ctx()}")
        self.llm.reset()  # the next eval drops the cache from position 0 on
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)

    def prompt_seconds(self, ids: list[int]) -> float:
        """llama-bench ``test_prompt``: ``ids`` decoded in batches of ``n_batch``, synchronized."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(ids))
        self._synchronize()
        return time.perf_counter() - start

    def generation_seconds(self, ids: list[int], budget_s: float = float("inf")) -> float:
        """llama-bench ``test_gen``: one token per decode, synchronized after each; ``TimeoutError``
        with the rate reached once ``budget_s`` is spent."""
        self.llm.reset()
        start = time.perf_counter()
        for done, token in enumerate(ids, 1):
            self.llm.eval([token])
            self._synchronize()
            elapsed = time.perf_counter() - start
            if elapsed > budget_s and done < len(ids):
                raise TimeoutError(f"{done} of {len(ids)} single-token steps took {elapsed:.1f} s "
                                   f"({done / elapsed:.2f} tok/s), over the {budget_s:g} s budget")
        return time.perf_counter() - start

    def greedy(self, ids: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Argmax decoding from ``ids`` (the last position's logits), stopping after ``eos`` as
        :func:`scalellm.generate.greedy` does; the new token ids."""
        self._need_logits("greedy")
        self.llm.reset()
        self.llm.eval(list(ids))
        new: list[int] = []
        while len(new) < max_new_tokens:
            new.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            if new[-1] == eos:
                break
            self.llm.eval(new[-1:])
        return new


# ---------------------------------------------------------------- the worker process


def serve(inp, out) -> int:
    """Open the model the first frame describes, then answer requests until ``close`` or end of input."""
    try:
        params = read_frame(inp)
        runner = Runner(open_model(**params), params.get("logits_all", False))
    except EOFError:
        return 0
    except Exception as exc:
        write_frame(out, ("err", _sendable(exc)))
        return 1
    write_frame(out, ("ok", runner.info()))
    try:
        while True:
            try:
                name, args = read_frame(inp)
            except EOFError:
                return 0
            if name == "close":
                write_frame(out, ("ok", None))
                return 0
            try:
                if name not in REQUESTS:
                    raise ValueError(f"unknown request {name!r}; the worker serves {REQUESTS}")
                reply = ("ok", getattr(runner, name)(*args))
            except Exception as exc:
                reply = ("err", _sendable(exc))
            write_frame(out, reply)
    finally:
        runner.llm.close()


def main() -> int:
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # llama.cpp's printf and any stray print go to stderr, never into the frames
    sys.stdout = sys.stderr
    return serve(sys.stdin.buffer, channel)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["KV_TYPES", "OffloadUnavailable", "REQUESTS", "Runner", "gpu_layers", "open_model", "read_frame", "serve",
           "write_frame"]
