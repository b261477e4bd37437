"""Byte-level positions in a GGUF header, for the tests that damage a file on purpose."""

from __future__ import annotations

import struct


def kv_offset(data: bytes, key: str) -> int:
    """Offset of the value-type field that follows ``key`` in the header (GGUF v3: a key is a uint64
    length and its UTF-8 bytes)."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)
