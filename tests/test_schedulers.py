"""Jobs under real batch schedulers running on the test hosts (tests/testhosts.py).

SLURM (tests/slurmcluster.py) and Grid Engine (tests/sgecell.py) run for real: their
daemons start once per session, their nodes are the test hosts' network namespaces, and
the jobs go through ``sbatch``, ``salloc``/``srun`` and ``qsub -pe`` as a user's would.
A job's workers report their network namespace: that proves on which host each ran.
The example job scripts of examples/submit_files/ run as they are. PBS and LSF cannot
be installed here: tests/test_remote.py imitates their allocations with the variables
they set.

``--signal=B:USR1@N`` and ``--requeue`` (a job told its time is nearly up, and run
again) have their scheduler side here: :func:`submit_with_signal`, :func:`signal_batch`,
:func:`job_state`; draining the map on that signal is the runtime's part.

Skipped, with the reason, where the schedulers cannot run (not root, packages missing,
a daemon that fails: its log's tail is in the reason).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time

import pytest
from test_remote import WHERE
from test_walltime import PROGRAM as CHECKPOINTED_MAP

from conftest import REPO, computed, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]


def _ns(hosts, name: str) -> str:
    """What ``readlink /proc/self/ns/net`` says in test host ``name``."""
    return f"net:[{hosts.ns_inode(name)}]"


def _head_ns() -> str:
    return os.readlink("/proc/self/ns/net")


def _seen(text: str) -> set:
    """The WHERE program's output line: {(network namespace, worker id, cwd)}."""
    lines = [line for line in text.splitlines() if line.startswith("[(")]
    assert len(lines) == 1, text
    return set(eval(lines[0]))  # noqa: S307 - our own program's output


def _assert_on(hosts, said: str, first: str, second: str, cwd) -> None:
    """The WHERE program ran 4 workers on test hosts ``first`` (the root's, where the
    job script ran) and ``second``, all in directory ``cwd``."""
    seen = _seen(said)
    by_worker = {wid: ns for ns, wid, _ in seen}
    assert sorted(by_worker) == [0, 1, 2, 3], said
    assert by_worker[0] == _ns(hosts, first), said
    assert set(by_worker.values()) == {_ns(hosts, first), _ns(hosts, second)}, said
    assert {d for _, _, d in seen} == {str(cwd)}


# ----------------------------------------------------------------------------- SLURM
# A job's end: its state then is one of these (squeue's long names).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def _sbatch(slurm, tmp_path, *args: str, cwd=None, env=None,
            timeout: float = 90) -> str:
    """Submit a job from the head and wait for its end; return its output.

    ``sbatch --wait`` would do, but it polls every few seconds: the test polls faster.
    """
    out_file = tmp_path / "job.out"
    r = slurm.run(["sbatch", "--parsable", f"--output={out_file}", *args], timeout=30,
                  cwd=cwd or tmp_path, env=env)
    assert r.returncode == 0, f"sbatch: {r.stderr}"
    state = wait_job(slurm, r.stdout.strip().split(";")[0], ENDED, timeout)
    said = out_file.read_text() if out_file.exists() else "(no output file)"
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"{state}\njob output:\n{said}\n{slurm.log_tail()}")
    return said


def job_state(slurm, job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, ExitCode, Restarts, ...)."""
    r = slurm.run(["scontrol", "-o", "show", "job", job_id], timeout=20)
    assert r.returncode == 0, r.stderr
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def wait_job(slurm, job_id: str, states: tuple[str, ...], timeout: float = 60) -> dict:
    """Until the job's state is one of ``states``; return its fields."""
    deadline = time.monotonic() + timeout
    while (state := job_state(slurm, job_id))["JobState"] not in states:
        assert time.monotonic() < deadline, f"job {job_id} still {state}"
        time.sleep(0.1)
    return state


def test_sbatch_job_runs_workers_on_two_nodes(slurm, tmp_path):
    """sbatch -N 2: the batch script runs on the first node, the launcher reads the
    allocation and starts the other workers with srun, on both nodes."""
    hosts = slurm.hosts
    prog = write_program(tmp_path, WHERE)
    command = shlex.join([sys.executable, "-m", "scoop", "-v", prog, "80"])
    said = _sbatch(slurm, tmp_path, "--nodes=2", "--ntasks-per-node=2", f"--wrap={command}")
    first, second = hosts.names[:2]
    _assert_on(hosts, said, first, second, tmp_path)
    assert f"hosts from the SLURM allocation: {first}:2 {second}:2" in said


def test_the_example_slurm_script_runs(slurm, tmp_path):
    """examples/submit_files/slurm.sh as it is, submitted from the repository with the
    nodes' size given on the command line (it asks for 8 tasks per node)."""
    env = slurm.env()
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"  # its `python`
    said = _sbatch(slurm, tmp_path, "--ntasks-per-node=2",
                   os.path.join(REPO, "examples", "submit_files", "slurm.sh"), cwd=REPO,
                   env=env)
    first, second = slurm.hosts.names[:2]
    assert f"hosts from the SLURM allocation: {first}:2 {second}:2" in said
    assert "full_tree: OK depth 10, 1024 leaves" in said


def test_salloc_starts_the_workers_with_srun(slurm, tmp_path):
    """salloc runs the launcher on the head; inside the allocation its default launcher
    is srun, whose step puts the workers on the allocated nodes (no ssh at all)."""
    hosts = slurm.hosts
    prog = write_program(tmp_path, WHERE)
    r = slurm.run(["salloc", "--nodes=2", "--ntasks-per-node=2", sys.executable, "-m",
                   "scoop", "-vv", prog, "80"], timeout=90, cwd=tmp_path)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{slurm.log_tail()}"
    first, second = hosts.names[:2]
    by_worker = {wid: ns for ns, wid, _ in _seen(r.stdout)}
    assert sorted(by_worker) == [0, 1, 2, 3]
    assert by_worker[0] == _head_ns()  # salloc ran the launcher here
    assert {by_worker[w] for w in (1, 2, 3)} == {_ns(hosts, first), _ns(hosts, second)}
    assert re.search(r"host srun: .*srun --ntasks=3 .*-m scoop\.join", r.stderr), r.stderr


def test_srun_without_a_controller_points_at_launcher_ssh(slurm, tmp_path):
    """A real srun in an allocation whose controller does not answer (the variables of
    an allocation, a slurm.conf whose controller port is closed): the error says so and
    points at --launcher ssh."""
    conf = tmp_path / "slurm.conf"
    text = re.sub(r"(?m)^SlurmctldPort=\d+$", "SlurmctldPort=9", slurm.conf.read_text())
    conf.write_text(re.sub(r"(?m)^MessageTimeout=\d+$", "MessageTimeout=2", text))
    first, second = slurm.hosts.names[:2]
    env = slurm.env()
    env.update(SLURM_CONF=str(conf), SLURM_JOB_NODELIST=f"{first},{second}",
               SLURM_TASKS_PER_NODE="1(x2)", SLURM_JOB_ID="999999")
    prog = write_program(tmp_path, WHERE)
    r = slurm.run([sys.executable, "-m", "scoop", prog], timeout=90, env=env)
    assert r.returncode == 1, r.stderr
    assert "srun could not reach a SLURM controller" in r.stderr, r.stderr
    assert "--launcher ssh" in r.stderr


# --signal=B:USR1@N and --requeue: the scheduler's side of a checkpointed job. The drain
# itself (finish the tasks under way, checkpoint, exit so that the job requeues) is the
# runtime's part; these helpers submit such a job and show what reaches the launcher.
SIGNAL_PROBE = """
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    print("restart", os.environ.get("SLURM_RESTART_COUNT", "0"), "pid", os.getpid(),
          flush=True)
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    print("got", [signal.Signals(s).name for s in got], flush=True)
"""


def submit_with_signal(slurm, script: str, cwd, *, warn: str = "B:USR1@30",
                       requeue: bool = True, time_limit: str = "2",
                       extra: tuple[str, ...] = (), env=None) -> str:
    """Submit ``script`` (a job script's text) with ``--signal=WARN`` and ``--requeue``;
    return the job id. ``B:`` sends the signal to the batch shell only: the script
    should ``exec`` the launcher, so that the launcher is that process."""
    path = cwd / "job.sh"
    path.write_text(script)
    args = ["sbatch", "--parsable", f"--signal={warn}", f"--time={time_limit}",
            f"--output={cwd / 'job.out'}", "--open-mode=append", *extra]
    if requeue:
        args.append("--requeue")
    r = slurm.run([*args, str(path)], timeout=30, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def signal_batch(slurm, job_id: str, name: str = "USR1") -> None:
    """Send signal ``name`` to the job's batch process now, as ``--signal=B:...`` does
    when the time limit comes near (slurmctld looks at time limits only every 30 s)."""
    r = slurm.run(["scancel", "--batch", f"--signal={name}", job_id], timeout=20)
    assert r.returncode == 0, r.stderr


def wait_output(path, pattern: str, timeout: float = 30) -> str:
    """Until the job's output file matches ``pattern``; return its text."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in the job's output:\n{text}")


def test_signal_and_requeue_reach_the_batch_process(slurm, tmp_path):
    """A job submitted with --signal=B:USR1@N --requeue: USR1 reaches the process the
    batch script exec'd (as the time limit would send it; slurmctld checks time limits
    every 30 s, so the test delivers it with scancel --batch, the same path to the
    batch step), and a requeued job runs again with SLURM_RESTART_COUNT=1."""
    prog = write_program(tmp_path, SIGNAL_PROBE)
    job = submit_with_signal(slurm, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                                    f"{shlex.quote(prog)}\n", tmp_path)
    out = tmp_path / "job.out"
    wait_output(out, r"restart 0 pid \d+")
    assert job_state(slurm, job)["Requeue"] == "1"
    signal_batch(slurm, job, "USR1")
    wait_output(out, r"got \['SIGUSR1'\]")
    wait_job(slurm, job, ENDED, 30)
    r = slurm.run(["scontrol", "requeue", job], timeout=20)
    assert r.returncode == 0, r.stderr
    # slurmctld holds a requeued job (Reason=BeginTime) for a while before it may run
    # again; an administrator's StartTime=now lifts that.
    r = slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], timeout=20)
    assert r.returncode == 0, r.stderr
    text = wait_output(out, r"restart 1 pid \d+", timeout=60)
    r = slurm.run(["scancel", job], timeout=20)
    assert r.returncode == 0, r.stderr
    assert text.count("restart ") == 2


LONG_MAP = """
    import os, time
    from scoop import futures
    def slow(i):
        time.sleep(0.1)
        return i
    if __name__ == "__main__":
        print("started", os.getpid(), flush=True)
        print(sum(futures.map(slow, range(1200))))
"""


def test_usr1_before_the_time_limit_reaches_the_scoop_launcher(slurm, tmp_path):
    """The batch script execs the launcher: --signal=B:USR1 is delivered to it. The
    launcher drains the job (no task starts any more), and after --grace the program
    stops: the job ends with the documented status 75 (EXIT_WALLTIME), not killed by the
    signal, and its workers go with it."""
    prog = write_program(tmp_path, LONG_MAP)
    job = submit_with_signal(slurm, f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m scoop "
                                    f"--launcher ssh -n 2 --grace 2 {shlex.quote(prog)}\n",
                             tmp_path)
    wait_output(tmp_path / "job.out", r"started \d+")
    signal_batch(slurm, job, "USR1")
    state = wait_job(slurm, job, ENDED, 30)
    assert state["ExitCode"] == "75:0", state



def test_the_requeue_example_resumes_a_checkpointed_map_until_it_finishes(slurm, tmp_path):
    """examples/submit_files/slurm_requeue.sh end to end: USR1 (as --signal=B:USR1@N sends
    it) drains the checkpointed map, the launcher exits 75, the script requeues the job,
    and its second run computes only what was left and finishes."""
    log, db = tmp_path / "computed", tmp_path / "run.db"
    prog = write_program(tmp_path, CHECKPOINTED_MAP)  # 400 items of 20 ms
    example = open(os.path.join(REPO, "examples", "submit_files", "slurm_requeue.sh")).read()
    run_line = "python -m scoop --grace 90 my_long_map.py &"
    assert run_line in example
    script = example.replace(run_line, f"python -m scoop --grace 2 {shlex.quote(prog)} "
                                       f"{shlex.quote(str(log))} {shlex.quote(str(db))} &")
    env = slurm.env()
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"  # its `python`
    job = submit_with_signal(slurm, script, tmp_path, time_limit="10",
                             extra=("--nodes=1", "--ntasks-per-node=2"), env=env)
    deadline = time.monotonic() + 60
    while sum(computed(log).values()) < 40:
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()
        time.sleep(0.1)
    signal_batch(slurm, job, "USR1")
    wait_output(tmp_path / "job.out", r"time is up: requeueing \(run 0\)")
    first = computed(log)
    # requeued while it ran, the job waits (Reason=BeginTime) for cred_expire (10 s in
    # the test cluster) before it runs again
    state = wait_job(slurm, job, ENDED, 90)
    said = (tmp_path / "job.out").read_text()
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), (
        state, said, slurm.log_tail(4000))
    assert "True 400\nfinally ran" in said, said
    total = computed(log)
    assert set(total) == set(range(400)) and max(total.values()) <= 2, total
    assert 40 <= sum(first.values()) < 400 and sum(total.values()) - sum(first.values()) < 400

# ----------------------------------------------------------------------------- Grid Engine
def _qsub(sge, tmp_path, *args: str, cwd=None, env=None, timeout: float = 90) -> str:
    """``qsub -sync y`` from the head, the submitter's environment exported (-V): the
    test hosts' ssh first on PATH, the one scoop's workers reach the other hosts with.
    Return the job's output."""
    out_file = tmp_path / "job.out"
    if env is None:
        env = sge.env(sge.hosts.env())
    r = sge.run(["qsub", "-sync", "y", "-V", "-j", "y", "-o", str(out_file), *args],
                timeout=timeout, cwd=cwd or tmp_path, env=env)
    said = out_file.read_text() if out_file.exists() else "(no output file)"
    assert r.returncode == 0, f"qsub: {r.stdout}{r.stderr}\njob output:\n{said}\n{sge.log_tail()}"
    return said


def _allocation(said: str, scheduler: str) -> list[tuple[str, int]]:
    """The hosts the launcher read from the allocation (its -v line)."""
    m = re.search(rf"hosts from the {scheduler} allocation: (.*)", said)
    assert m, said
    return [(h, int(c)) for h, c in (e.rsplit(":", 1) for e in m[1].split())]


def test_qsub_pe_job_runs_workers_on_two_hosts(sge, tmp_path):
    """qsub -pe scoop 4 (2 slots per host): the job script runs on the PE's first host,
    the launcher reads $PE_HOSTFILE and starts the other host's workers over ssh."""
    hosts = sge.hosts
    prog = write_program(tmp_path, WHERE)
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m scoop -v "
                      f"{shlex.quote(prog)} 80\n")
    said = _qsub(sge, tmp_path, "-cwd", "-pe", "scoop", "4", str(script))
    allocated = _allocation(said, "SGE")
    assert [c for _, c in allocated] == [2, 2] and len({h for h, _ in allocated}) == 2
    first, second = (h for h, _ in allocated)
    _assert_on(hosts, said, first, second, tmp_path)


def test_the_example_sge_script_runs(sge, tmp_path):
    """examples/submit_files/sge.sh as it is, its parallel environment named on the
    command line (a cluster's PE names are its own)."""
    env = sge.env(sge.hosts.env())
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"  # its `python`
    said = _qsub(sge, tmp_path, "-pe", "scoop", "4",
                 os.path.join(REPO, "examples", "submit_files", "sge.sh"), cwd=REPO, env=env)
    assert len(_allocation(said, "SGE")) == 2
    assert "full_tree: OK depth 10, 1024 leaves" in said
