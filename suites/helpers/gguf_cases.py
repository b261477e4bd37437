"""The cases of the GGUF suites: the ggml types they cover, the real model's tensors they read, and
seeded weight-like data (the fixtures that load them live in suites/gguf/conftest.py)."""

from __future__ import annotations

import numpy as np

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


def method_name(ftype: str) -> str:
    """The cross-method table's name of a llama.cpp file type: ``"gguf-q4_k_m"`` (``tables.metric_name``)."""
    return f"gguf-{ftype.lower()}"
