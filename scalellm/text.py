"""Text the suites evaluate and fine-tune on, built from what every Python installation carries.

No download: the material is the docstrings of the Python standard library, real English prose
written by many authors, with some code samples in it. Two disjoint sources:

* **evaluation corpus** (``eval_corpus``): the module and public-class docstrings of
  ``EVAL_MODULES``, in that fixed order, cut to a fixed token budget (2,048 tokens by default:
  four 512-token windows).
* **instruction set** (``instruction_set``): pairs ``"Explain what `json.dumps` does."`` -> the first
  paragraph of that object's own docstring, over ``INSTRUCT_MODULES`` (no module in common with the
  evaluation corpus, so fine-tuning on one does not leak into perplexity on the other).

Docstrings change between Python releases, so the text is deterministic *for a given Python*:
the metadata records the Python version and the sha256 of the text, and a baseline measured on
3.11 should not be compared with one measured on 3.12 without a look at that hash.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import platform
import re
from dataclasses import dataclass, field
from typing import Any

#: Modules whose docstrings are mostly prose (not syntax tables), sorted. Platform-independent:
#: no ``os``/``posix`` docstrings, whose content depends on the operating system.
EVAL_MODULES = (
    "argparse",
    "calendar",
    "collections",
    "copy",
    "csv",
    "hashlib",
    "heapq",
    "pickle",
    "pprint",
    "random",
    "sched",
    "tempfile",
    "timeit",
    "uuid",
)

#: Modules the instruction pairs are drawn from, sorted; disjoint from ``EVAL_MODULES``.
INSTRUCT_MODULES = (
    "base64",
    "contextlib",
    "dataclasses",
    "difflib",
    "enum",
    "fractions",
    "functools",
    "glob",
    "gzip",
    "json",
    "logging",
    "queue",
    "re",
    "secrets",
    "shlex",
    "statistics",
    "string",
    "textwrap",
    "threading",
    "typing",
    "urllib.parse",
    "warnings",
    "zipfile",
)

#: Default budgets.
EVAL_TOKENS = 2048
INSTRUCT_EXAMPLES = 200
#: An instruction answer is the first paragraph of a docstring, kept when its length (characters,
#: whitespace collapsed) lies in this range: shorter ones say nothing ("Return a copy."), longer
#: ones are reference tables.
ANSWER_CHARS = (40, 600)

PROMPT_TEMPLATE = "Explain what `{qualname}` does."


def python_version() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _own_doc(obj: Any) -> str:
    """The object's own docstring, cleaned; never one inherited from a base class."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    return inspect.cleandoc(doc) if doc else ""


def _public_members(module, kinds) -> list[tuple[str, Any]]:
    """Public members of ``module`` defined in it (not re-exported), sorted by name."""
    out = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not any(kind(obj) for kind in kinds):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        out.append((name, obj))
    return out


def eval_text(modules: tuple[str, ...] = EVAL_MODULES) -> tuple[str, dict]:
    """The whole evaluation text (every docstring of ``modules``) and its metadata."""
    parts: list[str] = []
    for name in modules:
        module = importlib.import_module(name)
        doc = _own_doc(module)
        if doc:
            parts.append(doc)
        for _, cls in _public_members(module, (inspect.isclass,)):
            doc = _own_doc(cls)
            if doc:
                parts.append(doc)
    text = "\n\n".join(parts)
    meta = {
        "source": "Python standard-library docstrings (module and public classes)",
        "modules": list(modules),
        "python": python_version(),
        "chars": len(text),
        "sha256": _sha256(text),
    }
    return text, meta


@dataclass(frozen=True)
class Corpus:
    """A tokenized evaluation corpus."""

    ids: list[int]  # exactly ``meta["tokens"]`` token ids, no special tokens added
    text: str  # the decoded text of exactly those ids
    meta: dict = field(default_factory=dict)  # python version, sha256 of the source text, budget


def eval_corpus(tokenizer, n_tokens: int = EVAL_TOKENS, modules: tuple[str, ...] = EVAL_MODULES) -> Corpus:
    """The first ``n_tokens`` tokens of ``eval_text(modules)`` under ``tokenizer``.

    Raises ``ValueError`` when the modules do not hold that many tokens.
    """
    text, meta = eval_text(modules)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"evaluation text has {len(ids)} tokens, fewer than the budget {n_tokens}")
    meta = dict(meta, tokens=n_tokens, source_tokens=len(ids), tokenizer=type(tokenizer).__name__)
    ids = list(ids[:n_tokens])
    meta["ids_sha256"] = _sha256(",".join(map(str, ids)))
    return Corpus(ids=ids, text=tokenizer.decode(ids), meta=meta)


def _first_paragraph(doc: str) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def instruction_set(
    n_examples: int = INSTRUCT_EXAMPLES, modules: tuple[str, ...] = INSTRUCT_MODULES
) -> tuple[list[dict[str, str]], dict]:
    """``n_examples`` pairs ``{"prompt", "response"}``, in a fixed order, and their metadata.

    Candidates: public functions and classes of ``modules`` (module order, then name order) whose
    own docstring's first paragraph is ``ANSWER_CHARS`` long; the first ``n_examples`` are kept.
    """
    kinds = (inspect.isfunction, inspect.isbuiltin, inspect.isclass)
    examples: list[dict[str, str]] = []
    lo, hi = ANSWER_CHARS
    for mod_name in modules:
        module = importlib.import_module(mod_name)
        for name, obj in _public_members(module, kinds):
            answer = _first_paragraph(_own_doc(obj))
            if not lo <= len(answer) <= hi:
                continue
            examples.append({"prompt": PROMPT_TEMPLATE.format(qualname=f"{mod_name}.{name}"), "response": answer})
            if len(examples) == n_examples:
                break
        if len(examples) == n_examples:
            break
    if len(examples) < n_examples:
        raise ValueError(f"only {len(examples)} instruction examples in {modules}, fewer than {n_examples}")
    digest = _sha256("\n".join(f"{e['prompt']}\t{e['response']}" for e in examples))
    meta = {
        "source": "Python standard-library docstrings (first paragraph of functions and classes)",
        "modules": list(modules),
        "python": python_version(),
        "examples": len(examples),
        "sha256": digest,
    }
    return examples, meta


def prompts(n: int = 8, modules: tuple[str, ...] = INSTRUCT_MODULES) -> list[str]:
    """The first ``n`` instruction prompts, for generation jobs."""
    examples, _ = instruction_set(n, modules)
    return [e["prompt"] for e in examples]


__all__ = [
    "Corpus",
    "EVAL_MODULES",
    "EVAL_TOKENS",
    "INSTRUCT_MODULES",
    "eval_corpus",
    "eval_text",
    "instruction_set",
    "prompts",
    "python_version",
]

