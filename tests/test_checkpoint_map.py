"""``futures.map(..., checkpoint=FILE)`` in real jobs: a map killed half way (SIGTERM or
SIGKILL of the launcher) and run again computes each item at most once more, and gives
the same results as one that was never stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import computed, run_scoop, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

PROGRAM = """
    import sys, time
    from scoop import futures

    def slow(x):
        time.sleep(0.02)
        with open(sys.argv[1], "a") as f:   # one short append per computation
            f.write(f"{x}\\n")
        return x * x

    if __name__ == "__main__":
        how = sys.argv[3]
        if how == "ordered":
            out = list(futures.map(slow, range(300), checkpoint=sys.argv[2]))
        else:
            out = sorted(futures.map_as_completed(slow, range(300), chunksize=7,
                                                  checkpoint=sys.argv[2]))
        print(out == [x * x for x in range(300)], len(out))
"""


@pytest.mark.parametrize("how", ["ordered", "as_completed"])
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_a_map_killed_half_way_resumes_where_it_was(tmp_path, kill, how):
    prog = write_program(tmp_path, PROGRAM)
    log, db = tmp_path / "computed", tmp_path / "run.db"
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "2", prog, str(log),
                             str(db), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while sum(computed(log).values()) < 120 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)  # results are written to the file in batches, every 0.5 s
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(kill)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    first = computed(log)
    assert 120 <= sum(first.values()) < 300, "the first run was not stopped half way"
    # (the root's own first chunk, a quarter of the map, is recorded when it ends)
    out = run_scoop("-n", "2", prog, str(log), str(db), how)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "300"]
    total = computed(log)
    assert set(total) == set(range(300))
    assert max(total.values()) <= 2, "an item was computed more than once more"
    again = sum(total.values()) - sum(first.values())
    assert again < 300, "the second run resumed nothing"
    # a third run computes nothing
    out = run_scoop("-n", "2", prog, str(log), str(db), how)
    assert out.stdout.split() == ["True", "300"], out.stderr
    assert computed(log) == total


def test_progress_counts_stored_items_as_done(tmp_path):
    prog = write_program(tmp_path, PROGRAM)
    log, db = tmp_path / "computed", tmp_path / "run.db"
    assert run_scoop("-n", "2", prog, str(log), str(db), "ordered").returncode == 0
    out = run_scoop("-n", "2", "--progress", prog, str(log), str(db), "ordered")
    assert out.stdout.split() == ["True", "300"], out.stderr
    assert out.stderr.splitlines()[-1].startswith("scoop: 300/300 items  100%"), out.stderr
    assert sum(computed(log).values()) == 300
