"""The end of a job's time (SIGUSR1 to the launcher, ``--walltime``): no task starts any
more, the program stops after ``--grace`` with status 75, a checkpointed map resumes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from scoop._launch.walltime import EXIT_WALLTIME, WallClock, parse_duration

from conftest import computed, run_scoop, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

PROGRAM = """
    import sys, time
    from scoop import futures

    def slow(x):
        time.sleep(0.02)
        with open(sys.argv[1], "a") as f:
            f.write(f"{x}\\n")
        return x * x

    if __name__ == "__main__":
        try:  # chunks of 0.2 s: each done within the 1 s grace, under load too
            out = list(futures.map(slow, range(400), checkpoint=sys.argv[2], chunksize=10))
            print(out == [x * x for x in range(400)], len(out))
        finally:
            print("finally ran", flush=True)
"""


def test_usr1_drains_then_stops_with_75_and_the_map_resumes(tmp_path):
    prog = write_program(tmp_path, PROGRAM)
    log, db = tmp_path / "computed", tmp_path / "run.db"
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "2", "--grace", "1", prog,
                             str(log), str(db)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while sum(computed(log).values()) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_WALLTIME == 75, err
    assert out.splitlines() == ["finally ran"], (out, err)
    assert "time is up" in err and "Traceback" not in err, err
    first = computed(log)
    assert 60 <= sum(first.values()) < 400
    again = run_scoop("-n", "2", prog, str(log), str(db))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["True 400", "finally ran"]
    total = computed(log)
    assert set(total) == set(range(400)) and max(total.values()) <= 2
    assert sum(total.values()) - sum(first.values()) < 400  # it resumed


def test_walltime_option_stops_the_job_in_time(tmp_path):
    prog = write_program(tmp_path, PROGRAM.replace("range(400)", "range(100000)"))
    log, db = tmp_path / "computed", tmp_path / "run.db"
    out = run_scoop("-n", "2", "--walltime", "0:04", "--grace", "1", prog, str(log), str(db),
                    timeout=90)
    assert out.returncode == 75, out.stderr
    assert "time is up" in out.stderr, out.stderr
    assert out.stdout.splitlines() == ["finally ran"]
    assert 0 < sum(computed(log).values()) < 100000  # stopped by the clock, not the end


def test_the_wall_clock_gives_sigusr1_back_as_it_found_it():
    def before(signum, frame):
        pass
    previous = signal.signal(signal.SIGUSR1, before)
    try:
        clock = WallClock(launcher=None, grace=1).start()
        assert signal.getsignal(signal.SIGUSR1) is not before
        clock.stop()
        assert signal.getsignal(signal.SIGUSR1) is before
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("1:30", 90), ("01:00:00", 3600),
                                           ("2-00:00:01", 2 * 86400 + 1)])
def test_durations_are_read_as_slurm_writes_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "a", "1:2:3:4", "-5"])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)
