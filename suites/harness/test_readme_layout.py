"""The README's layout section names every module of the library, and nothing that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "scalellm"
#: Modules a reader needs no line for: the package marker and ``python -m scalellm``'s entry point.
UNLISTED = {"__init__.py", "__main__.py"}


def library_block(readme: str) -> str:
    """The lines of the '## Layout' code block from ``scalellm/`` up to the next top-level entry."""
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    lines = block.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("scalellm/"))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    return "\n".join(lines[start:end])


def named_entries(block: str) -> set[str]:
    """Module files (``x.py``) and folders (``x/``) named as the first words of an entry."""
    return set(re.findall(r"(?<![\w/.])([a-z_][a-z0-9_]*(?:\.py|/))", block)) - {"scalellm/"}


def present_entries() -> set[str]:
    modules = {p.name for p in LIBRARY.glob("*.py")} - UNLISTED
    packages = {f"{p.name}/" for p in LIBRARY.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def test_the_readme_layout_names_every_library_module():
    named = named_entries(library_block((ROOT / "README.md").read_text()))
    missing, stale = sorted(present_entries() - named), sorted(named - present_entries())
    assert not missing and not stale, (f"README.md '## Layout': scalellm/ has {missing} that the section does not "
                                       f"name; the section names {stale} that scalellm/ does not have")


def test_the_layout_scan_reads_modules_and_folders():
    block = "scalellm/   the library\n  a.py b.py   two modules\n  quant/   codecs, e.g. c.py\n"
    assert named_entries(block) == {"a.py", "b.py", "quant/", "c.py"}
