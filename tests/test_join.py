"""Workers started by another launcher join a running job (python -m scoop.join)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from conftest import marked_processes, run_scoop, write_program

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]

UNTIL_ALL_SEEN = """
    import sys, time, scoop
    from scoop import futures
    def who(_):
        time.sleep(0.02)
        return scoop.worker
    if __name__ == "__main__":
        # until every worker (or as many as the first argument says) has run a task
        target = int(sys.argv[1]) if len(sys.argv) > 1 else scoop.SIZE
        seen, deadline = set(), time.time() + 40
        while len(seen) < target and time.time() < deadline:
            seen |= set(futures.map(who, range(20), chunksize=1))
        print(scoop.SIZE, sorted(seen), flush=True)
"""


def read_job_file(job_file, launcher: subprocess.Popen, timeout: float = 30) -> dict:
    """The job file's content, once it is complete: it may exist before it is fully
    written, so it is read until it parses, with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(job_file.read_text())
        except (OSError, ValueError) as exc:  # absent, empty or half written
            if launcher.poll() is not None:
                why = (f"the launcher exited ({launcher.returncode}) before its job file "
                       f"was complete: {launcher.stderr.read()}")
                raise AssertionError(why) from exc
            assert time.monotonic() < deadline, f"no complete job file: {exc}"
            time.sleep(0.02)


def test_workers_started_by_another_launcher_join(tmp_path):
    job_file = tmp_path / "job.json"
    prog = write_program(tmp_path, UNTIL_ALL_SEEN)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "scoop", "-n", "1", "--external", "2", "--job-file",
         str(job_file), "--broker-hostname", "127.0.0.1", prog],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    joiners = []
    try:
        key = read_job_file(job_file, launcher)["key"]
        assert stat.S_IMODE(job_file.stat().st_mode) == 0o600
        # the test is "any launcher": it starts two workers itself
        joiners = [subprocess.Popen([sys.executable, "-m", "scoop.join", str(job_file)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(2)]
        commands = marked_processes().values()
        assert commands and not [c for c in commands if key in c], "key on a command line"
        out, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, err
        assert out.strip() == "3 [0, 1, 2]"
        for j in joiners:
            j.wait(15)
            assert j.returncode == 0, j.stderr.read()
        assert not job_file.exists(), "the job file outlived the job"
    finally:
        for p in [launcher, *joiners]:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_join_usage_and_missing_job_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "scoop.join"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2 and "usage" in out.stderr
    out = subprocess.run([sys.executable, "-m", "scoop.join", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "cannot read the job file" in out.stderr


SRUN_STAND_IN = """#!/bin/sh
# Stand-in for SLURM's srun inside an allocation: run the command --ntasks times,
# with SLURM_PROCID set, and wait for all (what srun does for a job step).
n=1
while [ $# -gt 0 ]; do
    case "$1" in
        --ntasks=*) n="${1#--ntasks=}"; shift ;;
        --*) shift ;;
        *) break ;;
    esac
done
echo "srun $n: $*" >> "$SRUN_LOG"
i=0
while [ $i -lt $n ]; do
    SLURM_PROCID=$i "$@" &
    i=$((i + 1))
done
wait
"""


def test_srun_launcher_inside_a_slurm_allocation(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text(SRUN_STAND_IN)
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bindir}:{env['PATH']}", SRUN_LOG=str(tmp_path / "srun.log"),
               SLURM_JOB_NODELIST="localhost", SLURM_TASKS_PER_NODE="3", HOME=str(tmp_path))
    prog = write_program(tmp_path, UNTIL_ALL_SEEN)
    out = run_scoop("-v", prog, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3 [0, 1, 2]"
    step = (tmp_path / "srun.log").read_text()
    assert step.startswith("srun 2: ") and "-m scoop.join" in step
    assert not list((tmp_path / ".scoop" / "jobs").iterdir()), "job file left behind"
