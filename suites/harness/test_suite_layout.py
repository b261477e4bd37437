"""How the suites are wired: helpers live in suites/helpers/, never in another test module, a conftest or
a suite package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SUITES = Path(__file__).resolve().parents[1]
TEST_MODULES = sorted(SUITES.rglob("test_*.py"))
#: Every module of the suites but the helpers themselves: test modules, conftests, package markers.
SUITE_MODULES = sorted(p for p in SUITES.rglob("*.py") if "helpers" not in p.relative_to(SUITES).parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, dotted (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", TEST_MODULES, ids=lambda p: p.relative_to(SUITES).as_posix())
def test_a_test_module_imports_no_other_test_module(path):
    others = sorted(name for name in imported_modules(path) if name.rsplit(".", 1)[-1].startswith("test_"))
    assert not others, f"{path.relative_to(SUITES.parent)} imports test module(s) {others}: move what they share " \
                       "to suites/helpers/"


def test_the_scan_sees_an_import_of_a_test_module(tmp_path):
    module = tmp_path / "test_x.py"
    module.write_text("from suites.gguf.test_gguf_files import kv_offset\nimport suites.helpers.bounds\n")
    assert "suites.gguf.test_gguf_files" in imported_modules(module)


def suite_imports_outside_helpers(path: Path) -> list[str]:
    """The ``suites.*`` modules ``path`` imports that are not ``suites.helpers`` or a module of it."""
    return sorted(name for name in imported_modules(path)
                  if name.startswith("suites.") and name != "suites.helpers" and not name.startswith("suites.helpers."))


@pytest.mark.parametrize("path", SUITE_MODULES, ids=lambda p: p.relative_to(SUITES).as_posix())
def test_a_suite_module_takes_shared_code_only_from_the_helpers(path):
    others = suite_imports_outside_helpers(path)
    assert not others, f"{path.relative_to(SUITES.parent)} imports {others}: a conftest holds fixtures, a suite " \
                       "package nothing; move what they share to suites/helpers/"


def test_the_scan_sees_an_import_of_a_conftest(tmp_path):
    module = tmp_path / "conftest.py"
    module.write_text("from suites.gguf.conftest import ALL_TYPES\nfrom suites.helpers.bounds import X\n")
    assert suite_imports_outside_helpers(module) == ["suites.gguf.conftest", "suites.gguf.conftest.ALL_TYPES"]
