"""Open a GGUF file and check it, or fail with one clear error that names the file.

``gguf.GGUFReader`` (gguf-py) maps the file and trusts its header: on a damaged file it raises
whatever its parsing hits first (``IndexError`` on an empty slice, ``ValueError`` from a reshape,
``UnicodeDecodeError``, ``KeyError``), and an array length or count read from garbage can make it
loop for a very long time over an empty slice. :func:`open_gguf` therefore walks the header itself
first, bounds-checking every read against the file size, following the layout of the GGUF spec
(``ggml/docs/gguf.md``: magic, version, tensor count, key/value count, the key/value pairs, the
tensor infos, padding to ``general.alignment``, the tensor data), checks that every tensor's bytes
lie inside the file, and only then hands the file to ``GGUFReader``.

Every problem is a :class:`GGUFFileError` whose message starts with the path.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf-py's READER_SUPPORTED_VERSIONS reads
HEADER_BYTES = 24  # magic (4) + version (u32) + tensor count (u64) + key/value count (u64)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT, unless the key general.alignment says otherwise

# GGUF value types (gguf.md, ``enum gguf_type``) -> size in bytes of a scalar; 8 is STRING, 9 ARRAY.
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_U32, _STRING, _ARRAY = 4, 8, 9


class GGUFFileError(ValueError):
    """A file that is not a readable GGUF file: ``GGUFFileError(path, problem)``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: not a valid GGUF file: {problem}")


class _Cursor:
    """Little-endian reads from ``data`` with a bounds check before each one."""

    def __init__(self, path: Path, data: bytes | mmap.mmap):
        self.path, self.data, self.pos = path, data, 0

    def skip(self, n: int, what: str) -> int:
        """Advance over ``n`` bytes; return where they start."""
        if self.pos + n > len(self.data):
            raise GGUFFileError(self.path, f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                                           f"but the file is {len(self.data)} bytes long")
        self.pos += n
        return self.pos - n

    def take(self, n: int, what: str) -> bytes:
        start = self.skip(n, what)
        return self.data[start:start + n]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.u64(f"length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFFileError(self.path, f"{what} at offset {self.pos - len(raw)} is not UTF-8 ({exc.reason})") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        """Skip one value of GGUF type ``vtype`` (arrays recursively, as gguf.md nests them)."""
        if vtype in _SCALAR_SIZE:
            self.skip(_SCALAR_SIZE[vtype], what)
        elif vtype == _STRING:
            self.string(what)
        elif vtype == _ARRAY and depth < 8:
            itype, count = self.u32(f"element type of {what}"), self.u64(f"length of {what}")
            if itype in _SCALAR_SIZE:  # one bounds check for the whole array
                self.skip(count * _SCALAR_SIZE[itype], f"{count} elements of {what}")
            else:
                for i in range(count):
                    self.skip_value(itype, f"{what}[{i}]", depth + 1)
        else:
            raise GGUFFileError(self.path, f"{what} has unknown value type {vtype}")


def _walk_header(path: Path, data: bytes | mmap.mmap) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Bounds-check the header as gguf.md lays it out; raise GGUFFileError on the first problem.

    Returns one ``(name, ggml dims, ggml type, absolute data offset)`` per tensor.
    """
    if len(data) < HEADER_BYTES:
        raise GGUFFileError(path, f"file is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte GGUF header")
    cur = _Cursor(path, data)
    magic = cur.take(4, "magic")
    if magic != MAGIC:
        raise GGUFFileError(path, f"bad magic {magic!r} in the first 4 bytes (expected {MAGIC!r})")
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFileError(path, f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")
    n_tensors, n_kv = cur.u64("tensor count"), cur.u64("key/value count")
    # each key/value pair takes at least 8 + 4 + 1 bytes, each tensor info at least 8 + 4 + 8 + 4 + 8
    if n_kv * 13 > len(data) or n_tensors * 32 > len(data):
        raise GGUFFileError(path, f"header claims {n_tensors} tensors and {n_kv} key/value pairs, more than "
                                  f"a {len(data)}-byte file can hold (truncated or corrupt)")
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"key of key/value pair {i}")
        vtype = cur.u32(f"value type of {key!r}")
        if key == "general.alignment" and vtype == _U32:
            alignment = cur.u32(f"value of {key!r}")
            if alignment == 0 or alignment & (alignment - 1):
                raise GGUFFileError(path, f"general.alignment is {alignment}, not a power of two")
        else:
            cur.skip_value(vtype, f"value of {key!r}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFFileError(path, f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = tuple(cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        infos.append((name, dims, cur.u32(f"type of tensor {name!r}"), cur.u64(f"offset of tensor {name!r}")))
    data_start = -(-cur.pos // alignment) * alignment  # tensor data begins at the next aligned offset
    return [(name, dims, ggml_type, data_start + offset) for name, dims, ggml_type, offset in infos]


def _check_extents(path: Path, size: int, infos) -> None:
    """Every tensor's bytes (gguf-py's GGML_QUANT_SIZES: block size, type size) lie inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, dims, ggml_type, start in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFFileError(path, f"tensor {name!r} has unknown ggml type {ggml_type}") from None
        if dims[0] % block:
            raise GGUFFileError(path, f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                                      f"{GGMLQuantizationType(ggml_type).name} block size {block}")
        end = start + math.prod(dims) // block * type_size
        if end > size:
            raise GGUFFileError(path, f"truncated: tensor {name!r} needs bytes {start} to {end}, but the file "
                                      f"is {size} bytes long")


def open_gguf(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` for ``path``, after checking the file; :class:`GGUFFileError` if it is damaged.

    Checks, in order: the file exists and is a regular file; the header (magic ``GGUF``, a
    supported version, counts that fit the file, every key/value pair and tensor info inside the
    file); every tensor's data inside the file (a truncated file fails here, naming the first
    tensor cut off); then gguf-py's own parse (any exception it raises becomes a GGUFFileError).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFFileError(path, "no such file" if not path.exists() else "not a regular file")
    size = path.stat().st_size
    if size < HEADER_BYTES:  # also keeps mmap away from an empty file, which it refuses
        raise GGUFFileError(path, f"file is {size} bytes, shorter than the {HEADER_BYTES}-byte GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        infos = _walk_header(path, data)
    _check_extents(path, size, infos)

    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py raises many kinds on bad data; report them as one kind
        raise GGUFFileError(path, f"gguf-py cannot parse it: {type(exc).__name__}: {exc}") from exc


def numpy_shape(tensor) -> tuple[int, ...]:
    """The numpy (row-major) shape of a ``ReaderTensor``: GGUF lists dimensions in ggml order, reversed."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))
