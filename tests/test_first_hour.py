"""What a new user meets in the first hour: stdin, --version, -m, errors that explain
themselves, the missing __main__ guard, the job file, a quiet -vv."""

from __future__ import annotations

import re

import pytest

from conftest import run_scoop, write_program

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_leftovers")]


def test_verbose_run_has_no_connection_noise_at_shutdown(tmp_path):
    prog = write_program(tmp_path, """
        from scoop import futures
        def double(x):
            return 2 * x
        if __name__ == "__main__":
            print(sum(futures.map(double, range(100))))
    """)
    for _ in range(3):  # the noise depended on timing: look more than once
        out = run_scoop("-vv", "-n", "3", prog)
        assert out.returncode == 0, out.stderr
        assert out.stdout == "9900\n"
        assert "the root ended with status 0" in out.stderr  # -vv is on
        noise = [line for line in out.stderr.splitlines()
                 if re.search(r"unreachable|cannot send|zmq|WARNING|ERROR|Traceback", line,
                              re.IGNORECASE)]
        assert not noise, out.stderr
