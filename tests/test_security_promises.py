"""SECURITY.md names the test that keeps each promise: every test it names exists, so a renamed or removed test
cannot leave a promise without one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test) for every ``tests/x.py::test_y`` and ``::test_y`` (the file named last) in ``text``."""
    named, current = [], None
    for file, test in re.findall(r"`(tests/[\w/]+\.py)?(?:::(test_\w+))?`", text):
        current = file or current
        if test:
            assert current, f"{test} is named before any test file"
            named.append((current, test))
    return named


def _tests_in(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}


def test_every_test_security_md_names_exists():
    text = (ROOT / "SECURITY.md").read_text()
    files = set(re.findall(r"`(tests/[\w/]+\.py)", text))
    assert files and all((ROOT / file).is_file() for file in files), sorted(
        f for f in files if not (ROOT / f).is_file()
    )
    named = _named_tests(text)
    assert len(named) >= 20
    missing = [f"{file}::{test}" for file, test in named if test not in _tests_in(ROOT / file)]
    assert not missing, missing
