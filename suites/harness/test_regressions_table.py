"""The replayed-regressions table (``scripts/regressions.toml``, read by ``scripts/replay_regressions.py``)
stays true to the suites: every row loads, names two different releases and an upstream link, and
every test it names still exists (a renamed test would silently turn a row into "no test")."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def replay_script():
    spec = importlib.util.spec_from_file_location("replay_regressions", ROOT / "scripts" / "replay_regressions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ROWS = replay_script().load_rows()


def test_the_table_has_at_least_ten_rows_with_unique_ids():
    ids = [row.id for row in ROWS]
    assert len(ids) >= 10 and len(set(ids)) == len(ids), ids


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_each_row_names_two_releases_an_upstream_link_and_existing_tests(row):
    assert row.buggy != row.fixed, f"{row.id}: buggy and fixed are the same release {row.buggy}"
    assert row.upstream or row.note, f"{row.id}: no upstream link and no note saying where the fix was found"
    for node in row.tests:
        path, _, name = node.partition("::")
        function = name.split("[", 1)[0]
        file = ROOT / path
        assert file.is_file(), f"{row.id}: {node}: no file {path}"
        defined = {n.name for n in ast.walk(ast.parse(file.read_text())) if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{row.id}: {node}: {path} defines no {function}"
