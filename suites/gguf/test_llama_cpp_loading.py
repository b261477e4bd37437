"""Loading the real model through llama.cpp: the build's kernels run it, and damaged copies give an error
naming the file, never a crash.

:func:`scalellm.llama_cpp_run.load_checked` checks a file with ``open_gguf``'s bounds-checked header
walk first, then lets llama.cpp load it in a child process (:func:`~scalellm.llama_cpp_run.probe`):
whatever llama.cpp does with a bad file -- an exception, a native abort, a hang -- the caller gets
one ``GGUFFileError`` (``LlamaCppLoadError`` when llama.cpp was the one to refuse) whose message
starts with the path and says what went wrong.

The same child-process trial tells whether this build's default CPU kernels run the model at all
(:func:`~scalellm.llama_cpp_run.kernel_check`): measured here, llama-cpp-python 0.3.36 built with
``-march=native`` on a Xeon that advertises AMX dies with SIGILL (``tilezero`` in
``ggml_backend_amx_mul_mat``) at the first batched matmul of a quantized model; the other suites
then run on ggml's plain kernels (``use_extra_bufts`` off) and this module's first test fails.

Every model runs in a worker process that never imports torch (:func:`~scalellm.llama_cpp_run.load`):
the worker's imports hold no torch, an exception in it reaches the caller as itself, a worker killed
by a signal is a ``LlamaCppWorkerError`` naming the file and the signal, and close or garbage
collection ends it.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from scalellm import llama_cpp_run, models
from scalellm.gguf_file import GGUFFileError
from scalellm.llama_cpp_run import LlamaCppLoadError, LlamaCppWorkerError
from suites.helpers.gguf_bytes import kv_offset

pytestmark = [pytest.mark.gguf]


@pytest.fixture(scope="module")
def real_bytes(smollm2, llama_cpp_py) -> bytes:
    return models.smollm2_gguf().read_bytes()


def copy_with(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_names_the_file(exc: GGUFFileError | LlamaCppWorkerError, path, *fragments: str) -> None:
    __tracebackhide__ = True
    message = str(exc)
    assert message.startswith(str(path)) and exc.path == path, message
    for fragment in fragments:
        assert fragment in message, message


def with_block_count(data: bytes, n: int) -> bytes:
    """The file with ``llama.block_count`` set to ``n``: a header gguf-py reads, a model llama.cpp can't build."""
    out = bytearray(data)
    at = kv_offset(data, "llama.block_count")
    assert struct.unpack_from("<I", out, at)[0] == 4  # GGUF value type UINT32
    struct.pack_into("<I", out, at + 4, n)
    return bytes(out)


def test_default_cpu_kernels_run_the_real_model(llama_cpp_kernels):
    """llama.cpp's default CPU kernels (extra buffer types: AMX, CPU_REPACK) decode a batch of the real
    model without killing their process. A failure here is the build's: rebuild llama-cpp-python
    without AMX (``CMAKE_ARGS="-DGGML_NATIVE=OFF"``: AVX2/FMA/F16C, no AVX512, no AMX)."""
    ok, why = llama_cpp_kernels
    assert ok, f"llama.cpp's default CPU kernels die on the real model: {why}"


def test_the_intact_model_loads_and_decodes(llama_cpp_kernels):
    llm = llama_cpp_run.load_checked(models.smollm2_gguf(), "cpu", n_ctx=16, logits_all=True,
                                     extra_buffers=llama_cpp_kernels[0])
    try:
        assert llm.n_vocab() == 49152
        logits = llama_cpp_run.window_logits(llm, [llm.token_bos()] * 8)
        assert logits.shape == (8, 49152) and np.isfinite(logits).all() and logits.any(axis=-1).all()
    finally:
        llm.close()


# ---------------------------------------------------------------- the worker process


def test_the_worker_never_imports_torch():
    """What the worker process imports (its module, then llama_cpp as it opens a model) pulls in no torch:
    llama.cpp's CUDA build and torch's CUDA cannot share a process (scalellm.llama_cpp_worker)."""
    pytest.importorskip("llama_cpp")
    script = ("import sys, scalellm.llama_cpp_worker, llama_cpp; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture
def worker(llama_cpp_kernels):
    llm = llama_cpp_run.load(models.smollm2_gguf(), "cpu", n_ctx=16, logits_all=True, extra_buffers=llama_cpp_kernels[0])
    yield llm
    llm.close()


def test_an_error_in_the_worker_is_raised_as_itself(worker):
    n = worker.n_ctx()  # llama.cpp rounds a context of 16 up (256 here)
    with pytest.raises(ValueError, match=f"{n + 1} tokens do not fit the context of {n}"):
        llama_cpp_run.window_logits(worker, [worker.token_bos()] * (n + 1))
    assert llama_cpp_run.window_logits(worker, [worker.token_bos()] * 4).shape == (4, 49152)  # still serving


def test_a_worker_killed_by_a_signal_is_an_error_naming_file_and_signal(worker):
    """What a segfault in llama.cpp does to the worker, done from outside: the caller gets an error, not a crash."""
    os.kill(worker.pid, signal.SIGSEGV)
    with pytest.raises(LlamaCppWorkerError) as info:
        llama_cpp_run.window_logits(worker, [worker.token_bos()] * 4)
    assert_names_the_file(info.value, models.smollm2_gguf(), "killed by SIGSEGV", "during window_logits")
    with pytest.raises(LlamaCppWorkerError, match="the worker is closed"):
        llama_cpp_run.window_logits(worker, [worker.token_bos()] * 4)


def test_close_and_garbage_collection_end_the_worker(llama_cpp_kernels):
    path = models.smollm2_gguf()
    closed = llama_cpp_run.load(path, "cpu", n_ctx=16, extra_buffers=llama_cpp_kernels[0])
    closed.close()
    assert closed._proc.returncode == 0  # it freed its model and exited when asked
    dropped = llama_cpp_run.load(path, "cpu", n_ctx=16, extra_buffers=llama_cpp_kernels[0])
    proc = dropped._proc
    del dropped
    assert proc.returncode is not None


def test_truncated_copy_is_refused_before_llama_cpp_sees_it(real_bytes, tmp_path):
    path = copy_with(tmp_path, real_bytes[:len(real_bytes) // 2], "truncated.gguf")
    with pytest.raises(GGUFFileError) as info:
        llama_cpp_run.load_checked(path)
    assert type(info.value) is GGUFFileError  # open_gguf's verdict, not the child's
    assert_names_the_file(info.value, path, "truncated", "tensor 'blk.")


def test_truncated_copy_given_to_llama_cpp_fails_in_the_child(real_bytes, tmp_path):
    """Past open_gguf's check, straight into llama.cpp: the child fails, the parent gets its reason."""
    path = copy_with(tmp_path, real_bytes[:len(real_bytes) // 2], "truncated.gguf")
    with pytest.raises(LlamaCppLoadError) as info:
        llama_cpp_run.probe(path, extra_buffers=False)
    assert_names_the_file(info.value, path, "exited with status 1", "error loading model", "tensor 'blk.")


def test_bad_magic_is_refused_before_llama_cpp_sees_it(real_bytes, tmp_path):
    path = copy_with(tmp_path, b"GGML" + real_bytes[4:], "bad-magic.gguf")
    with pytest.raises(GGUFFileError) as info:
        llama_cpp_run.load_checked(path)
    assert type(info.value) is GGUFFileError
    assert_names_the_file(info.value, path, "bad magic")


def test_corrupted_block_count_is_refused_by_llama_cpp(real_bytes, tmp_path):
    """A header that parses (open_gguf accepts it) but names 31 blocks of a 30-block model."""
    path = copy_with(tmp_path, with_block_count(real_bytes, 31), "bad-block-count.gguf")
    with pytest.raises(LlamaCppLoadError) as info:
        llama_cpp_run.load_checked(path, extra_buffers=False)
    assert_names_the_file(info.value, path, "error loading model", "'blk.30.attn_norm.weight' not found")


def test_a_native_abort_in_the_child_is_an_error_not_a_crash(smollm2, tmp_path):
    """What a GGML_ASSERT does to its process (abort()), done on purpose: the parent reports it."""
    path = models.smollm2_gguf()
    with pytest.raises(LlamaCppLoadError) as info:
        llama_cpp_run.probe(path, script="import os, sys; print('GGML_ASSERT(stand-in)', file=sys.stderr); os.abort()")
    assert_names_the_file(info.value, path, "killed by SIGABRT", "GGML_ASSERT(stand-in)")


def test_a_hang_in_the_child_is_an_error(smollm2):
    path = models.smollm2_gguf()
    with pytest.raises(LlamaCppLoadError) as info:
        llama_cpp_run.probe(path, script="import time; time.sleep(60)", timeout=1)
    assert_names_the_file(info.value, path, "did not finish loading it within 1 s")
