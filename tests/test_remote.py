"""Jobs over real ssh hosts: network namespaces with their own sshd (tests/testhosts.py).

Skipped, with the reason, where test hosts cannot be made (not root, no sshd or ip).
Traffic goes only to the test hosts' private addresses and to loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import computed, run_scoop, up_test_hosts, wait_no_processes, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

WHERE = """
    import os, sys, time, scoop
    from scoop import futures
    def where(_):
        time.sleep(0.05)
        return os.readlink("/proc/self/ns/net"), scoop.worker, os.getcwd()
    if __name__ == "__main__":
        seen = set(futures.map(where, range(int(sys.argv[1]) if len(sys.argv) > 1 else 60)))
        print(sorted(seen))
"""


@pytest.fixture(scope="module")
def hosts():
    with up_test_hosts(3) as th:
        yield th


CHECKED_MAP = """
    import sys, time
    from scoop import futures
    def work(i):
        time.sleep(float(sys.argv[2]))
        return i * i
    if __name__ == "__main__":
        n = int(sys.argv[1])
        print("started", flush=True)
        assert list(futures.map(work, range(n), chunksize=1)) == [i * i for i in range(n)]
        print("all results right", flush=True)
"""


def _start_job(hosts, prog: str, names: list[str], *prog_args: str,
               env: dict | None = None) -> subprocess.Popen:
    """Start a job on this machine plus ``names``; return once its program has started."""
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "--hosts", "127.0.0.1", *names,
                             "--ssh-executable", _ssh(hosts), prog, *prog_args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "started", proc.stderr.read()
    return proc


def _netns(pid: int | str = "self") -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _ssh(hosts) -> str:
    return str(hosts.ssh_wrapper)


def _hostfile(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _host_ns(hosts, name: str) -> str:
    out = hosts.run(name, "readlink /proc/self/ns/net", timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _assert_namespaces_empty(hosts) -> None:
    deadline = time.monotonic() + 15
    while True:
        left = {h: [p for p in hosts.pids_in(h) if _is_scoop(p)] for h in hosts.names}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(left.values()), f"scoop processes left in the test hosts: {left}"


def _is_scoop(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"scoop._start_" in f.read()  # a worker or a host agent
    except OSError:
        return False


def test_hostfile_spreads_workers_over_every_host(hosts, tmp_path):
    a, b, c = hosts.names[:3]
    hostfile = _hostfile(tmp_path, ["127.0.0.1 1", f"{a} 1", f"{b} 1", f"{c} 1"])
    prog = write_program(tmp_path, WHERE)
    out = run_scoop("--hostfile", hostfile, "--ssh-executable", _ssh(hosts), prog, "80")
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout)  # noqa: S307 - our own program's output
    by_worker = {wid: ns for ns, wid, _ in seen}
    assert by_worker[0] == _netns()
    assert {by_worker[w] for w in (1, 2, 3)} == {_host_ns(hosts, h) for h in (a, b, c)}
    _assert_namespaces_empty(hosts)


def test_n_placement_and_root_on_a_remote_host(hosts, tmp_path):
    a, b = hosts.names[:2]
    prog = write_program(tmp_path, WHERE.replace(
        "print(sorted(seen))", "print(sorted(seen)); print(scoop.HOSTS)"))
    # -n 3 over a:1 b:1 adds the third worker round-robin from the first host
    out = run_scoop("--hosts", a, b, "-n", "3", "--ssh-executable", _ssh(hosts), prog, "60")
    assert out.returncode == 0, out.stderr
    seen_line, hosts_line = out.stdout.splitlines()
    assert eval(hosts_line) == [(a, 2), (b, 1)]  # noqa: S307 - scoop.HOSTS
    seen = eval(seen_line)  # noqa: S307
    ns = {wid: n for n, wid, _ in seen}
    assert ns[0] == _host_ns(hosts, a)  # the first host runs the program
    assert sorted(ns) == [0, 1, 2]
    assert list(ns.values()).count(_host_ns(hosts, a)) == 2


def test_broker_hostname_path_and_prolog(hosts, tmp_path):
    a = hosts.names[0]
    workdir = tmp_path / "remote-cwd"
    workdir.mkdir()
    prolog = tmp_path / "prolog.sh"
    prolog.write_text("export SCOOP_TEST_PROLOG=activated\n")
    prog = write_program(tmp_path, """
        import os, time, scoop
        from scoop import futures
        def probe(_):
            time.sleep(0.05)
            return scoop.worker, os.environ.get("SCOOP_TEST_PROLOG"), os.getcwd()
        if __name__ == "__main__":
            print(sorted(set(futures.map(probe, range(40)))))
    """)
    out = run_scoop("--hosts", "127.0.0.1", a, "--ssh-executable", _ssh(hosts),
                    "--broker-hostname", hosts.head, "--prolog", str(prolog),
                    "--path", str(workdir), prog)
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout)  # noqa: S307
    remote = [s for s in seen if s[0] == 1]
    assert remote == [(1, "activated", str(workdir))]


def test_tunnel_reaches_a_loopback_only_broker(hosts, tmp_path):
    a = hosts.names[0]
    prog = write_program(tmp_path, WHERE)
    out = run_scoop("-v", "-e", "--hosts", "127.0.0.1", a, "--ssh-executable", _ssh(hosts),
                    prog, "40")
    assert out.returncode == 0, out.stderr
    # the broker listened on loopback only: the host could reach it only through ssh
    assert "broker at tcp://127.0.0.1:" in out.stderr
    seen = eval(out.stdout)  # noqa: S307
    assert {ns for ns, _, _ in seen} == {_netns(), _host_ns(hosts, a)}


def test_encrypted_job_over_ssh_hosts(hosts, tmp_path):
    a, b = hosts.names[:2]
    prog = write_program(tmp_path, WHERE)
    out = run_scoop("--encrypt", "--hosts", "127.0.0.1", a, b, "--ssh-executable",
                    _ssh(hosts), prog, "60")
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout)  # noqa: S307
    assert {ns for ns, _, _ in seen} == {_netns(), _host_ns(hosts, a), _host_ns(hosts, b)}


@pytest.mark.parametrize("flag", [None, "--no-encrypt"])
def test_jobs_across_hosts_are_encrypted_unless_told_not_to(hosts, tmp_path, flag):
    """Captured on the link to the test hosts: a job's data crosses it encrypted by
    default, and in the clear with --no-encrypt (which shows that the capture sees it)."""
    from test_encrypt import ECHO, LoopbackCapture

    marker = os.urandom(16).hex()
    prog = write_program(tmp_path, ECHO)
    with LoopbackCapture(hosts.head_if) as cap:
        out = run_scoop(*([flag] if flag else []), "--hosts", *hosts.names[:2],
                        "--ssh-executable", _ssh(hosts), prog, marker)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    seen = marker.encode() in cap.data
    assert seen == (flag == "--no-encrypt"), (
        f"marker {'found' if seen else 'not found'} in {len(cap.data)} captured bytes")


def test_remote_output_reaches_the_terminal(hosts, tmp_path):
    a = hosts.names[0]
    prog = write_program(tmp_path, """
        import sys, time, scoop
        from scoop import futures
        def shout(i):
            time.sleep(0.05)
            print(f"task {i} on worker {scoop.worker}", flush=True)
            print(f"err {i} on worker {scoop.worker}", file=sys.stderr, flush=True)
        if __name__ == "__main__":
            list(futures.map(shout, range(20)))
    """)
    out = run_scoop("--hosts", "127.0.0.1", a, "--ssh-executable", _ssh(hosts), prog)
    assert out.returncode == 0, out.stderr
    assert "on worker 1" in out.stdout and "on worker 1" in out.stderr


def test_remote_worker_killed_midway_its_work_runs_elsewhere(hosts, tmp_path):
    a = hosts.names[0]
    proc = _start_job(hosts, write_program(tmp_path, CHECKED_MAP), [a], "60", "0.1")
    try:
        time.sleep(0.8)
        victims = [p for p in hosts.pids_in(a) if _is_worker(p)]
        assert victims, "no remote worker to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip().endswith("all results right")
    assert "no heartbeat" in err


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"scoop._start_worker" in f.read()
    except OSError:
        return False


def test_host_without_count_gets_its_cpu_count(hosts, tmp_path):
    a = hosts.names[0]
    remote_cpus = int(hosts.run(a, "nproc").stdout)
    hostfile = _hostfile(tmp_path, ["127.0.0.1 1", a])
    prog = write_program(tmp_path, "import scoop\nif __name__ == '__main__':\n"
                                   "    print(scoop.SIZE)\n")
    out = run_scoop("--hostfile", hostfile, "--ssh-executable", _ssh(hosts), prog)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 1 + remote_cpus


def test_unreachable_broker_address_fails_fast_with_advice(hosts, tmp_path):
    a = hosts.names[0]
    prog = write_program(tmp_path, WHERE)
    unused = f"{hosts.net}.250"  # in the test range, where no host answers
    # fails rather than waits: run_scoop's timeout is the bound, no wall-clock assertion;
    # the remote worker gives up after SCOOP_CONNECT_TIMEOUT (the launcher passes it on)
    out = run_scoop("--hosts", "127.0.0.1", a, "--ssh-executable", _ssh(hosts),
                    "--broker-hostname", unused, prog,
                    env=dict(os.environ, SCOOP_CONNECT_TIMEOUT="3"))
    assert out.returncode != 0
    assert f"host {a}" in out.stderr and "--broker-hostname" in out.stderr
    _assert_namespaces_empty(hosts)


def test_workers_of_a_cut_host_leave_by_themselves(hosts, tmp_path):
    """No ssh EOF can reach a host whose cable is cut: its workers' watchdogs must notice
    the broker is gone, and the job finishes on the workers it has left."""
    a = hosts.names[0]
    # SCOOP_BROKER_TIMEOUT (10 s by default) reaches the remote workers with their config
    proc = _start_job(hosts, write_program(tmp_path, CHECKED_MAP), [a], "40", "0.2",
                      env=dict(os.environ, SCOOP_BROKER_TIMEOUT="4"))
    try:
        time.sleep(1.0)
        assert [p for p in hosts.pids_in(a) if _is_worker(p)], "no remote worker"
        hosts.cut(a)
        deadline = time.monotonic() + 60  # they leave within SCOOP_BROKER_TIMEOUT
        while [p for p in hosts.pids_in(a) if _is_worker(p)]:
            assert time.monotonic() < deadline, "workers of the cut host did not leave"
            time.sleep(0.2)
        out, err = proc.communicate(timeout=60)
    finally:
        hosts.heal(a)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip().endswith("all results right")


def test_unreachable_host_is_named_with_ssh_saying_why_once(hosts, tmp_path):
    """A host that drops packets: ssh gives up (its ConnectTimeout, set by the launcher)
    and the error says the host could not be reached, with ssh's own line once."""
    a, b = hosts.names[:2]
    hosts.cut(b)
    try:
        prog = write_program(tmp_path, WHERE)
        # ssh takes the first ConnectTimeout it sees: this one, not the launcher's 10 s
        out = run_scoop("--hosts", "127.0.0.1", a, b, "--ssh-executable",
                        f"{_ssh(hosts)} -o ConnectTimeout=3", prog)
    finally:
        hosts.heal(b)
    assert out.returncode == 1
    assert f"host {b}: could not be reached" in out.stderr, out.stderr
    said = [line for line in out.stderr.splitlines() if "Connection timed out" in line]
    assert len(said) == 1 and hosts.address(b) in said[0], out.stderr
    assert "ConnectTimeout" in out.stderr  # how to wait longer
    assert "--broker-hostname" not in out.stderr  # not a broker address problem
    _assert_namespaces_empty(hosts)


def test_remote_root_reads_the_launchers_stdin(hosts, tmp_path):
    a = hosts.names[0]
    prog = write_program(tmp_path, """
        import socket, sys
        from scoop import futures
        if __name__ == "__main__":
            first = input()
            rest = [int(line) for line in sys.stdin]
            print(socket.gethostname(), first, sum(rest), sum(futures.map(abs, rest)))
    """)
    lines = "hello\n" + "".join(f"{-i}\n" for i in range(1, 101))
    out = run_scoop("--hosts", a, "127.0.0.1", "--ssh-executable", _ssh(hosts), prog,
                    input=lines)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{a} hello -5050 5050\n"


def test_remote_root_killed_by_a_signal_is_explained(hosts, tmp_path):
    a = hosts.names[0]
    prog = write_program(tmp_path, """
        import os, signal
        from scoop import futures
        if __name__ == "__main__":
            print(sum(futures.map(abs, range(-5, 5))), os.getpid(), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = run_scoop("--hosts", a, "127.0.0.1", "--ssh-executable", _ssh(hosts), prog)
    assert out.returncode == 128 + signal.SIGKILL, out.stderr
    total, pid = out.stdout.split()
    assert total == "25"
    assert (f"on {a}: the root worker (worker 0, pid {pid}) was killed by SIGKILL: out of "
            "memory?") in out.stderr
    assert "LaunchError" not in out.stderr and f"host {a}:" not in out.stderr
    _assert_namespaces_empty(hosts)


def test_remote_root_is_told_when_the_time_is_up(hosts, tmp_path):
    """--walltime with the root on another host: the launcher cannot signal it, the
    broker tells it (its watchdog's PONG), and it stops as a local root does: 75, the
    checkpointed map's finished results recorded."""
    a = hosts.names[0]
    log, db = tmp_path / "computed", tmp_path / "run.db"
    prog = write_program(tmp_path, """
        import sys, time
        from scoop import futures
        def slow(x):
            time.sleep(0.02)
            with open(sys.argv[1], "a") as f:
                f.write(f"{x}\\n")
            return x
        if __name__ == "__main__":
            try:
                print(len(list(futures.map(slow, range(100000), checkpoint=sys.argv[2]))))
            finally:
                print("finally ran", flush=True)
    """)
    out = run_scoop("--hosts", a, a, "127.0.0.1", "--ssh-executable", _ssh(hosts),
                    "--walltime", "0:06", "--grace", "1", prog, str(log), str(db), timeout=90)
    assert out.returncode == 75, out.stderr
    assert out.stdout.splitlines() == ["finally ran"], out.stdout
    assert "the job's time is up: stopped early" in out.stderr, out.stderr
    assert "cannot be told" not in out.stderr
    assert 0 < sum(computed(log).values()) < 100000
    _assert_namespaces_empty(hosts)


def test_host_without_scoop(hosts, tmp_path):
    a = hosts.names[0]
    nosite = tmp_path / "python-without-scoop"
    nosite.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    nosite.chmod(0o755)
    prog = write_program(tmp_path, WHERE)
    elsewhere = tmp_path / "cwd"  # not the source tree, where scoop would be importable
    elsewhere.mkdir()
    out = run_scoop("--hosts", "127.0.0.1", a, "--ssh-executable", _ssh(hosts),
                    "--python-executable", str(nosite), "--path", str(elsewhere), prog)
    assert out.returncode != 0
    assert f"host {a}" in out.stderr and "scoop is not installed" in out.stderr
    assert "No module named 'scoop'" in out.stderr


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_nothing_left_on_remote_hosts_after_interrupt_or_kill(hosts, tmp_path, how):
    a, b = hosts.names[:2]
    prog = write_program(tmp_path, """
        import time
        from scoop import futures
        def spin(_):
            end = time.time() + 60
            while time.time() < end:
                time.sleep(0.01)
        if __name__ == "__main__":
            print("started", flush=True)
            list(futures.map(spin, range(6)))
    """)
    proc = _start_job(hosts, prog, [a, b])
    try:
        deadline = time.monotonic() + 20
        while not all(any(_is_scoop(p) for p in hosts.pids_in(h)) for h in (a, b)):
            assert time.monotonic() < deadline, "remote workers never started"
            time.sleep(0.1)
        time.sleep(0.5)
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
            assert proc.returncode == 130
        else:
            proc.kill()
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_namespaces_empty(hosts)
    assert not wait_no_processes(timeout=15)


def _scheduler_env(kind: str, names: list[str], tmp_path) -> dict[str, str]:
    if kind == "slurm":
        return {"SLURM_JOB_NODELIST": ",".join(names),
                "SLURM_TASKS_PER_NODE": f"1(x{len(names)})"}
    if kind == "pbs":
        nodefile = tmp_path / "nodefile"
        nodefile.write_text("".join(f"{n}\n" for n in names))
        return {"PBS_NODEFILE": str(nodefile)}
    if kind == "sge":
        pe = tmp_path / "pe_hostfile"
        pe.write_text("".join(f"{n} 1 all.q@{n} UNDEFINED\n" for n in names))
        return {"PE_HOSTFILE": str(pe)}
    return {"LSB_MCPU_HOSTS": " ".join(f"{n} 1" for n in names)}


@pytest.mark.parametrize("kind", ["slurm", "pbs", "sge", "lsf"])
def test_batch_scheduler_allocation_runs_on_its_hosts(hosts, tmp_path, kind):
    names = hosts.names[:2]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PBS_", "PE_", "LSB_"))}
    env.update(_scheduler_env(kind, names, tmp_path))
    prog = write_program(tmp_path, WHERE)
    # The variables imitate an allocation that has no controller: where a real srun is
    # installed, it would be chosen (and fail to reach one), so say ssh.
    launcher = ["--launcher", "ssh"] if kind == "slurm" else []
    out = run_scoop("-v", *launcher, "--ssh-executable", _ssh(hosts), prog, "40", env=env)
    assert out.returncode == 0, out.stderr
    seen = eval(out.stdout)  # noqa: S307
    assert {ns for ns, _, _ in seen} == {_host_ns(hosts, n) for n in names}
    assert " allocation: " in out.stderr  # -v logs where the hosts came from


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_processes_started_by_remote_tasks_end_with_the_job(hosts, tmp_path, ending):
    """A remote worker's task children (Popen, fork+exec, fork alone) and setsid daemons
    end with the job: the worker ends its own, the host agent what a dead worker left."""
    from test_descendants import SPAWNER, assert_all_gone

    prog = write_program(tmp_path, SPAWNER)
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "--hosts", "127.0.0.1",
                             hosts.names[0], "--ssh-executable", _ssh(hosts), prog,
                             "exit" if ending == "exit" else "wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 16, proc.stderr.read() if proc.poll() is not None else pids
        assert proc.stdout.readline().strip() == "workers [0, 1]", "none ran on the host"
        if ending == "sigkill":
            proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_all_gone(pids)


def test_remote_stderr_bytes_arrive_unchanged(hosts, tmp_path):
    """A remote program's stderr that is not UTF-8 reaches the terminal byte for byte."""
    prog = write_program(tmp_path, """
        import sys
        sys.stderr.buffer.write(b"caf\\xe9 \\xff\\xfe end\\n")
        sys.stderr.flush()
    """)
    out = subprocess.run([sys.executable, "-m", "scoop", "--hosts", hosts.names[0],
                          "--ssh-executable", _ssh(hosts), prog], capture_output=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert b"caf\xe9 \xff\xfe end\n" in out.stderr
