"""Run every program of examples/ with ``python -m scoop -n 2`` and with plain ``python``.

Each example states the last line it prints in its docstring (``Prints ``...``.``); the
test checks that the program exits with status 0 and that this is its final line. The
examples are found with a glob, so a new example is covered as soon as it is added (and
must state its final line).
"""

from __future__ import annotations

import ast
import glob
import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.py")))
RUN_TIMEOUT_S = 60


def expected_line(path: str) -> str:
    """The final line an example promises in its docstring: ``Prints ``LINE``.``."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), path)) or ""
    match = re.search(r"Prints ``(.+?)``", doc)
    assert match, f"{path}: the docstring must say what it prints: Prints ``...``"
    return match.group(1)


def run_example(*argv: str) -> subprocess.CompletedProcess:
    """Run ``python ARGV`` from the repo root."""
    return subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def check(proc: subprocess.CompletedProcess, expected: str) -> None:
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{report}"
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].strip() == expected, f"expected {expected!r} last\n{report}"


def test_examples_found():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"map_abs.py", "full_tree.py", "pi_montecarlo.py", "map_reduce.py",
            "shared_constants.py", "callbacks.py", "exceptions.py",
            "large_dataset.py"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_with_scoop(path):
    check(run_example("-m", "scoop", "-n", "2", path), expected_line(path))


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_serial_fallback(path):
    proc = run_example(path)
    check(proc, expected_line(path))
    assert "RuntimeWarning" in proc.stderr, "plain python should warn that scoop is off"


def test_full_tree_depth_argument():
    path = os.path.join(REPO, "examples", "full_tree.py")
    check(run_example("-m", "scoop", "-n", "2", path, "6"),
          "full_tree: OK depth 6, 64 leaves")
