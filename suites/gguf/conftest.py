"""Fixtures of the GGUF suite: gguf-py, the real model's GGUF file, and seeded weight-like data."""

from __future__ import annotations

import numpy as np
import pytest

from scalellm import models
from scalellm.gguf_file import numpy_shape, open_gguf
from suites.helpers.packages import need

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # blocks of 32; gguf-py quantizes these
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")  # super-blocks of 256; gguf-py only dequantizes
ALL_TYPES = LEGACY + K_QUANTS

# Real-model tensors read in the suite: one layer's projections at both ends of the network and
# the middle (every Q4_1 kind: rows of 576 and 1536), plus the Q8_0 token embedding.
REAL_TENSORS = tuple(f"blk.{layer}.{kind}.weight" for layer in (0, 15, 29)
                     for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))
EMBEDDING = "token_embd.weight"
EMBEDDING_ROWS = 2048  # of 49,152: 1.2 M weights are plenty, the whole table takes seconds to requantize
FFN_DOWN = "blk.0.ffn_down.weight"  # rows of 1536 = 6 super-blocks: the tensor K-quants can take


@pytest.fixture(scope="session")
def gguf_py():
    """gguf-py (the ``gguf`` package), or a skip with its install hint."""
    return need("gguf")


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


def normal_rows(shape, seed: int = 0) -> np.ndarray:
    """Seeded N(0, 1) in float32 (numpy's PCG64 stream)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def weight_like_rows(shape, seed: int = 0) -> np.ndarray:
    """Seeded data shaped like LLM weights: Student-t (5 dof) * 0.02, with every 64th column
    scaled by 8 (the outlier input channels of LLM.int8, arXiv:2208.07339 §3), float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(5, size=shape) * 0.02
    x[..., ::64] *= 8
    return x.astype(np.float32)
