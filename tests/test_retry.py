"""Retries of tasks that raise (``retries=``, ``futures.retrying``), in real jobs."""

from __future__ import annotations

import pickle

import pytest

from scoop import futures

from conftest import run_scoop, write_program

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]

FLAKY = """
    import os, sys
    from scoop import futures

    def flaky(x, fails=1, exc=ValueError):
        # fails the first `fails` times it runs for x (anywhere in the job)
        path = os.path.join(sys.argv[1], str(x))
        with open(path, "a") as f:
            f.write(".")
        if os.path.getsize(path) <= fails:
            raise exc(f"flaky {x}")
        return x * 10

    def count(x):
        return os.path.getsize(os.path.join(sys.argv[1], str(x)))

    if __name__ == "__main__":
        how = sys.argv[2]
        try:
            if how == "map":
                print(list(futures.map(flaky, range(20), retries=2)))
            elif how == "as_completed":
                print(sorted(futures.map_as_completed(flaky, range(20), retries=1)))
            elif how == "none":
                print(list(futures.map(flaky, range(20))))
            elif how == "not_chosen":
                print(list(futures.map(flaky, range(3), [1] * 3, [KeyError] * 3,
                                       retries=3, retry_on=ValueError)))
            elif how == "too_few":
                print(list(futures.map(flaky, range(3), [3] * 3, retries=2)))
            elif how == "submit":
                fut = futures.submit(futures.retrying(flaky, 2), 7, fails=2)
                print(fut.result())
        except Exception as exc:
            print("raised", type(exc).__name__, exc)
        print("runs", count(0))
"""


@pytest.mark.parametrize("how, out", [
    ("map", [str([x * 10 for x in range(20)]), "runs 2"]),
    ("as_completed", [str([x * 10 for x in range(20)]), "runs 2"]),
    ("none", ["raised ValueError flaky 0", "runs 1"]),
    ("not_chosen", ["raised KeyError 'flaky 0'", "runs 1"]),
    ("too_few", ["raised ValueError flaky 0", "runs 3"]),
])
def test_a_map_retries_its_failing_calls(tmp_path, how, out):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_scoop("-n", "2", write_program(tmp_path, FLAKY), str(marks), how)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == out, proc.stderr


def test_retrying_passes_the_functions_own_keyword_arguments(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = run_scoop("-n", "2", write_program(tmp_path, FLAKY), str(marks), "submit")
    assert proc.stdout.splitlines()[0] == "70", proc.stderr
    assert (marks / "7").stat().st_size == 3  # failed twice, then succeeded


def test_retrying_checks_its_arguments_and_pickles():
    with pytest.raises(ValueError):
        futures.retrying(abs, -1)
    with pytest.raises(TypeError):
        futures.retrying(3, 1)
    assert futures.retrying(abs, 0) is abs
    again = pickle.loads(pickle.dumps(futures.retrying(abs, 2, on=(ValueError,))))
    assert again(-3) == 3 and again.retries == 2 and again.on == (ValueError,)
