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
"""

from __future__ import annotations

import struct

import pytest

from scalellm import llama_cpp_run, models
from scalellm.gguf_file import GGUFFileError
from scalellm.llama_cpp_run import LlamaCppLoadError
from suites.gguf.test_gguf_files import kv_offset

pytestmark = [pytest.mark.gguf]


@pytest.fixture(scope="module")
def real_bytes(smollm2, llama_cpp_py) -> bytes:
    return models.smollm2_gguf().read_bytes()


def copy_with(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_names_the_file(exc: GGUFFileError, path, *fragments: str) -> None:
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
    llm = llama_cpp_run.load_checked(models.smollm2_gguf(), "cpu", n_ctx=16, extra_buffers=llama_cpp_kernels[0])
    try:
        assert llm.n_vocab() == 49152
        llm.eval([llm.token_bos()] * 8)
    finally:
        llm.close()


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
