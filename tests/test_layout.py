"""The shape of the code, checked statically (no import, no process): no class in
``scoop/`` longer than MAX_CLASS_LINES and no function longer than MAX_FUNCTION_LINES,
so that each piece keeps one role (issue 10). A docstring counts; a nested function
counts in its parent too."""

from __future__ import annotations

import ast
import pathlib

import pytest

SCOOP = pathlib.Path(__file__).resolve().parent.parent / "scoop"
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 80
MODULES = sorted(SCOOP.rglob("*.py"))


def _too_long(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            limit, what = MAX_CLASS_LINES, "class"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            limit, what = MAX_FUNCTION_LINES, "function"
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        lines = node.end_lineno - first + 1
        if lines > limit:
            found.append(f"{path.relative_to(SCOOP.parent)}:{node.lineno}: {what} "
                         f"{node.name} has {lines} lines (at most {limit})")
    return found


def test_modules_found():
    assert len(MODULES) > 20 and SCOOP / "futures.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SCOOP)))
def test_no_long_class_or_function(path):
    assert _too_long(path) == []
