"""Damaged GGUF files: :func:`scalellm.gguf_file.open_gguf` names the file and the problem, never crashes.

``gguf.GGUFReader`` on garbage raises whatever its parsing hits (IndexError, a reshape's
ValueError, ...) or loops over a length read from garbage; ``open_gguf`` walks the header with
bounds checks first (GGUF spec, ``ggml/docs/gguf.md``) and turns every problem into one
``GGUFFileError(path, problem)``. The files are written to ``tmp_path``: a small GGUF made with
``gguf.GGUFWriter`` (two tensors, string and array metadata) and cut-off copies of the real model.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalellm import models
from scalellm.gguf_file import HEADER_BYTES, GGUFFileError, numpy_shape, open_gguf
from scalellm.quant import gguf as ref
from suites.helpers.gguf_bytes import kv_offset

pytestmark = [pytest.mark.gguf, pytest.mark.reference]

SMALL_SHAPE = (4, 64)  # the Q8_0 tensor of the small file: 4 rows of 2 blocks
VOCAB = [f"tok{i}" for i in range(40)]  # a string array, like tokenizer.ggml.tokens
REAL_PREFIX = 4 << 20  # first 4 MiB of the real model: the whole header and part of the embedding


def write_small_gguf(path, gguf_py) -> np.ndarray:
    """A valid GGUF: metadata (u32, string, string array, f32 array), an F32 and a Q8_0 tensor.
    Returns the Q8_0 tensor's raw blocks."""
    x = np.random.default_rng(0).standard_normal(SMALL_SHAPE, dtype=np.float32)
    raw = ref.quantize(x, "Q8_0")
    writer = gguf_py.GGUFWriter(path, "llama")
    writer.add_uint32("test.count", 7)
    writer.add_string("general.name", "scalellm-small")
    writer.add_array("tokenizer.ggml.tokens", VOCAB)
    writer.add_array("test.scores", [0.5] * 16)
    writer.add_tensor("norm.weight", np.ones(64, np.float32))
    writer.add_tensor("proj.weight", raw, raw_dtype=gguf_py.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


@pytest.fixture
def small(tmp_path, gguf_py):
    """(path, bytes, raw Q8_0 blocks) of a freshly written small GGUF."""
    path = tmp_path / "small.gguf"
    raw = write_small_gguf(path, gguf_py)
    return path, path.read_bytes(), raw


def data_end(path) -> int:
    """Where the last tensor's bytes end (GGUFWriter pads the file after it to the alignment)."""
    return max(int(t.data_offset) + int(t.n_bytes) for t in open_gguf(path).tensors)


def damaged(tmp_path, data: bytes, name: str = "damaged.gguf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_refused(path, *fragments: str) -> GGUFFileError:
    """open_gguf(path) raises GGUFFileError naming the file and containing every fragment."""
    __tracebackhide__ = True
    with pytest.raises(GGUFFileError) as info:
        open_gguf(path)
    message = str(info.value)
    assert message.startswith(str(path)) and info.value.path == path, message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# ---------------------------------------------------------------- the valid files


def test_small_gguf_opens_and_its_tensor_decodes(small):
    path, _, raw = small
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    proj = tensors["proj.weight"]
    assert proj.tensor_type.name == "Q8_0" and numpy_shape(proj) == SMALL_SHAPE
    np.testing.assert_array_equal(np.asarray(proj.data), raw)
    assert reader.get_field("tokenizer.ggml.tokens").contents() == VOCAB


def test_real_model_opens(smollm2):
    assert len(smollm2.tensors) == 272  # 210 Q4_1 + 61 F32 + 1 Q8_0 (docs/evidence.md: SmolLM2 GGUF tensors)


# ---------------------------------------------------------------- missing, empty, short


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nope.gguf", "no such file")


def test_directory(tmp_path):
    assert_refused(tmp_path, "not a regular file")


@pytest.mark.parametrize("size", [0, 1, 4, HEADER_BYTES - 1])
def test_shorter_than_the_header(small, tmp_path, size):
    assert_refused(damaged(tmp_path, small[1][:size]), f"file is {size} bytes", "header")


# ---------------------------------------------------------------- corrupted header


@pytest.mark.parametrize("magic", [b"GGUX", b"\x00\x00\x00\x00", b"ggml", b"FUGG"])
def test_bad_magic(small, tmp_path, magic):
    assert_refused(damaged(tmp_path, magic + small[1][4:]), f"bad magic {magic!r}")


def test_bad_magic_on_the_real_model(smollm2, tmp_path):
    assert_refused(damaged(tmp_path, b"GGML" + _real_prefix()[4:], "real-bad-magic.gguf"), "bad magic b'GGML'")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(small, tmp_path, version):
    data = small[1][:4] + struct.pack("<I", version) + small[1][8:]
    assert_refused(damaged(tmp_path, data), f"unsupported GGUF version {version}")


@pytest.mark.parametrize("field, offset", [("tensors", 8), ("key/value pairs", 16)])
def test_counts_larger_than_the_file(small, tmp_path, field, offset):
    data = bytearray(small[1])
    data[offset:offset + 8] = struct.pack("<Q", 2**62)
    assert_refused(damaged(tmp_path, bytes(data)), f"{2**62} {field}", "more than")


def test_array_length_read_from_garbage_is_not_followed(small, tmp_path):
    """A string array claiming 2**40 elements: gguf-py would loop; we stop at the end of the file."""
    data = bytearray(small[1])
    at = kv_offset(bytes(data), "tokenizer.ggml.tokens") + 4 + 4  # past value type and element type
    data[at:at + 8] = struct.pack("<Q", 2**40)
    assert_refused(damaged(tmp_path, bytes(data)), "truncated", "tokenizer.ggml.tokens")


def test_unknown_value_type(small, tmp_path):
    data = bytearray(small[1])
    at = kv_offset(bytes(data), "general.name")
    data[at:at + 4] = struct.pack("<I", 99)
    assert_refused(damaged(tmp_path, bytes(data)), "'general.name' has unknown value type 99")


def test_key_that_is_not_utf8(small, tmp_path):
    data = small[1].replace(b"general.name", b"general.\xff\xfeme")
    assert_refused(damaged(tmp_path, data), "not UTF-8")


def test_unknown_tensor_type(small, tmp_path):
    data = bytearray(small[1])
    name = b"proj.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 2 * 8  # after the dims
    data[at:at + 4] = struct.pack("<I", 999)
    assert_refused(damaged(tmp_path, bytes(data)), "'proj.weight' has unknown ggml type 999")


@pytest.mark.parametrize("n_dims", [0, 5, 2**31])
def test_bad_dimension_count(small, tmp_path, n_dims):
    data = bytearray(small[1])
    name = b"norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    data[at:at + 4] = struct.pack("<I", n_dims)
    assert_refused(damaged(tmp_path, bytes(data)), f"'norm.weight' has {n_dims} dimensions")


def test_row_length_not_a_multiple_of_the_block(small, tmp_path):
    data = bytearray(small[1])
    name = b"proj.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4  # first (row) dimension
    data[at:at + 8] = struct.pack("<Q", 63)
    assert_refused(damaged(tmp_path, bytes(data)), "row length 63 is not a multiple of the Q8_0 block size 32")


# ---------------------------------------------------------------- truncated files


def test_truncated_in_the_tensor_data(small, tmp_path):
    end = data_end(small[0])
    assert_refused(damaged(tmp_path, small[1][:end - 1]), "truncated", "tensor 'proj.weight'",
                   f"file is {end - 1} bytes long")


def test_trailing_padding_is_not_needed(small, tmp_path):
    """Cutting only the alignment padding after the last tensor leaves a readable file."""
    end = data_end(small[0])
    assert end < len(small[1])  # the writer padded
    assert len(open_gguf(damaged(tmp_path, small[1][:end])).tensors) == 2


def _real_prefix() -> bytes:
    with open(models.smollm2_gguf(), "rb") as f:
        return f.read(REAL_PREFIX)


def test_truncated_real_model_names_the_first_tensor_cut_off(smollm2, tmp_path):
    """The first 4 MiB of SmolLM2: the header is whole, token_embd.weight (30 MB) is cut off."""
    assert_refused(damaged(tmp_path, _real_prefix(), "real-truncated.gguf"), "truncated", "'token_embd.weight'")


def test_truncated_real_model_header(smollm2, tmp_path):
    head = _real_prefix()[:100_000]  # inside the vocabulary: the string array runs off the end
    assert_refused(damaged(tmp_path, head, "real-head.gguf"), "truncated", "tokenizer.ggml.tokens")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**9))
def test_every_truncation_is_refused_cleanly(small, tmp_path, cut):
    """Cut the small file anywhere before its last tensor ends: always a GGUFFileError naming the file."""
    assert_refused(damaged(tmp_path, small[1][:cut % data_end(small[0])]))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(0, 10**9), value=st.integers(0, 255))
def test_any_corrupted_header_byte_opens_or_is_refused_cleanly(small, tmp_path, position, value):
    """Overwrite one byte of the header: the file opens, or GGUFFileError names it; nothing else."""
    data = bytearray(small[1])
    header_end = data.index(b"proj.weight") + 64  # past the last tensor info
    data[position % header_end] = value
    path = damaged(tmp_path, bytes(data))
    try:
        open_gguf(path)
    except GGUFFileError as exc:
        assert str(exc).startswith(str(path))
