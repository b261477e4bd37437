"""Shape fixtures: published model architectures as plain JSON, built with random weights.

Each ``fixtures/shapes/<name>.json`` is the architecture part of a published Hugging Face
``config.json`` (no weights, no tokenizer, no training settings). The key ``_scalellm`` carries
provenance: the repository the numbers come from and the published parameter count, which
``random_model(name, device="meta")`` reproduces; it is stripped before the dict reaches transformers.

A shape lets the suites ask "what would this cost for Llama-2-7B" (bytes, FLOPs, layer shapes) on
the meta device for free, and run small shapes for real with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Where the JSON files live: ``<repo>/fixtures/shapes``.
SHAPES_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "shapes"
META_KEY = "_scalellm"


def list_shapes() -> list[str]:
    """Names of the shape fixtures, sorted: ``['gpt2-124m', 'llama-2-7b', ...]``."""
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def _read(name: str) -> dict[str, Any]:
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(list_shapes())}")
    return json.loads(path.read_text())


def shape_info(name: str) -> dict[str, Any]:
    """The provenance block of a shape: ``{"source": ..., "parameters": <published count>}``."""
    return dict(_read(name).get(META_KEY, {}))


def shape_dict(name: str) -> dict[str, Any]:
    """The config dict of a shape, as transformers would read it from ``config.json``."""
    return {k: v for k, v in _read(name).items() if k != META_KEY}


def load_shape(name: str):
    """A ``transformers.PretrainedConfig`` for shape ``name``."""
    from transformers import AutoConfig

    data = shape_dict(name)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def random_model(name: str, dtype=None, device: str = "cpu", *, seed: int | None = 0):
    """A causal LM of shape ``name`` with random weights, in ``dtype``, on ``device``.

    ``device="meta"`` allocates nothing (parameter counts, byte predictions for 7B shapes on any
    machine). Any other device allocates the parameters directly there, under a ``torch.device``
    context, and initializes them there: there is no CPU copy first. ``seed`` reseeds torch's global
    generator (on the device it draws from) so the same call gives the same weights; ``None`` leaves
    the generator alone.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = load_shape(name)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    if seed is not None and device != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def parameter_count(model) -> int:
    """Distinct parameters (tied embeddings counted once), as model cards count them."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
