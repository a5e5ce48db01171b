"""`python -m scoop` as a user runs it: exit status, errors, signals, cleanup, options."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import marked_processes, run_scoop, wait_no_processes, write_program

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("no_leftovers")]


def test_exit_status_is_the_programs(tmp_path):
    prog = write_program(tmp_path, """
        import sys
        from scoop import futures
        if __name__ == "__main__":
            assert list(futures.map(abs, [-1, -2])) == [1, 2]
            sys.exit(3)
    """)
    assert run_scoop("-n", "2", prog).returncode == 3


def test_program_arguments_and_argv(tmp_path):
    prog = write_program(tmp_path, """
        import sys
        if __name__ == "__main__":
            print(sys.argv[1:])
    """)
    out = run_scoop("-n", "1", prog, "-n", "5", "--foo", "bar")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['-n', '5', '--foo', 'bar']"


def test_uncaught_remote_exception_prints_both_tracebacks(tmp_path):
    prog = write_program(tmp_path, """
        from scoop import futures
        def explode(x):
            import time
            time.sleep(0.05)  # long enough for worker 1 to join and take some
            raise KeyError(f"bad key {x}")
        if __name__ == "__main__":
            futs = [futures.submit(explode, i) for i in range(20)]
            futures.wait(futs)
            remote = [f for f in futs if "(local)" not in str(f.exception().__cause__)]
            remote[0].result()
    """)
    out = run_scoop("-n", "2", prog)
    assert out.returncode == 1
    assert "Traceback from worker 1" in out.stderr
    assert "in explode" in out.stderr and "KeyError" in out.stderr
    assert "remote[0].result()" in out.stderr  # the root's own frames


def test_missing_program(tmp_path):
    out = run_scoop(str(tmp_path / "nope.py"))
    assert out.returncode == 2
    assert "nope.py: no such file" in out.stderr
    assert "Traceback" not in out.stderr


def test_syntax_error_reads_as_pythons_own(tmp_path):
    """Editors and CI log parsers know Python's form: File/line, the line, the caret."""
    prog = write_program(tmp_path, "x = 1\ndef broken()\n    pass\n")
    out = run_scoop("-n", "2", prog)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines == [f'  File "{prog}", line 2', "    def broken()", lines[2],
                     "SyntaxError: expected ':'"]
    assert lines[2].strip() == "^"
    assert out.stdout == ""


def test_module_imported_on_every_worker_main_block_once(tmp_path):
    log = tmp_path / "log"
    prog = write_program(tmp_path, f"""
        import os, scoop
        from scoop import futures
        with open({str(log)!r}, "a") as f:
            f.write(f"import {{__name__}} {{os.getpid()}}\\n")

        def info(_):
            import time
            time.sleep(0.01)
            return (scoop.worker, scoop.IS_ORIGIN, scoop.SIZE, os.getpid())

        if __name__ == "__main__":
            with open({str(log)!r}, "a") as f:
                f.write("main\\n")
            seen = set()
            while len({{s[0] for s in seen}}) < 3:  # a loaded machine starts workers late
                seen |= set(futures.map(info, range(60)))
            print(sorted(seen))
    """)
    out = run_scoop("-n", "3", prog)
    assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    imports = [line for line in lines if line.startswith("import")]
    names = sorted(line.split()[1] for line in imports)
    assert names == ["__main__", "__scoop_main__", "__scoop_main__"]
    assert lines.count("main") == 1
    seen = eval(out.stdout)  # noqa: S307 - our own program's output
    assert {s[2] for s in seen} == {3}
    for wid, origin, _, _ in seen:
        assert origin == (wid == 0)


def test_module_level_data_stays_on_workers(tmp_path):
    """Top-level functions travel by reference: they read each worker's own globals."""
    prog = write_program(tmp_path, """
        import os
        from scoop import futures
        data = {"pid": os.getpid()}          # differs on every worker

        def whose(_):
            import time
            time.sleep(0.01)
            return data["pid"], os.getpid()

        if __name__ == "__main__":
            pairs = set(futures.map(whose, range(40)))
            assert all(a == b for a, b in pairs), pairs
            assert len(pairs) == 2, pairs
            def inner(x):                     # defined in the guarded block: by value
                return x + 1
            assert list(futures.map(inner, range(50))) == list(range(1, 51))
            print("ok")
    """)
    out = run_scoop("-n", "2", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_single_worker_nested_tree(tmp_path):
    prog = write_program(tmp_path, """
        from scoop import futures
        def tree(d):
            if d == 0:
                return 1
            a, b = futures.submit(tree, d - 1), futures.submit(tree, d - 1)
            return a.result() + b.result()
        if __name__ == "__main__":
            print(futures.submit(tree, 12).result())
    """)
    out = run_scoop("-n", "1", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "4096"


def _start(prog, *args):
    return subprocess.Popen([sys.executable, "-m", "scoop", *args, prog],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG_JOB = """
    import time
    from scoop import futures
    def spin(x):
        end = time.time() + 60
        while time.time() < end:
            pass
    if __name__ == "__main__":
        print("started", flush=True)
        list(futures.map(spin, range(4)))
"""


# The root waits with a deadline: the stop reaches it as a BrokenJobError in that wait.
TIMED_WAIT_JOB = LONG_JOB.replace("list(futures.map(spin, range(4)))",
                                  "futures.wait([futures.submit(spin, i) for i in range(4)], "
                                  "timeout=60)")


@pytest.mark.parametrize("job", ["map", "timed wait"])
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "Ctrl-C"),
                                             (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_stops_everything(tmp_path, sig, status, word, job):
    prog = write_program(tmp_path, LONG_JOB if job == "map" else TIMED_WAIT_JOB)
    proc = _start(prog, "-n", "3")
    assert proc.stdout.readline().strip() == "started"
    time.sleep(0.3)
    assert len(marked_processes({proc.pid})) >= 3
    proc.send_signal(sig)
    # the job would spin for 60 s: ending within this timeout is the signal's doing
    out, err = proc.communicate(timeout=40)
    assert proc.returncode == status, err
    assert word in err and "Traceback" not in err and "BrokenJobError" not in err, err
    assert not wait_no_processes(timeout=10)


def test_killed_launcher_leaves_no_worker(tmp_path):
    proc = _start(write_program(tmp_path, LONG_JOB), "-n", "3")
    assert proc.stdout.readline().strip() == "started"
    proc.kill()
    proc.wait(10)
    left = wait_no_processes(timeout=10)
    assert not left, left


def test_killed_root_ends_the_job_with_its_status_and_leaves_nothing(tmp_path):
    prog = write_program(tmp_path, LONG_JOB.replace(
        'print("started", flush=True)', 'print("started", os.getpid(), flush=True)').replace(
        "    if __name__", "    import os\n    if __name__"))
    proc = _start(prog, "-n", "3")
    word, root_pid = proc.stdout.readline().split()
    assert word == "started"
    time.sleep(0.3)
    os.kill(int(root_pid), signal.SIGKILL)  # the OOM killer picks the root
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGKILL, err
    left = wait_no_processes(timeout=10)
    assert not left, left


def test_help_reads_well():
    out = run_scoop("--help")
    assert out.returncode == 0
    for option in ("-n N", "--path", "--nice", "--python-executable", "--pythonpath",
                   "--verbose", "--quiet", "--log", "--debug", "program.py"):
        assert option in out.stdout


def test_process_options(tmp_path):
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / "helper_mod.py").write_text("VALUE = 42\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    prog = write_program(tmp_path, """
        import os, scoop
        from scoop import futures
        def probe(_):
            import time
            import helper_mod
            time.sleep(0.01)
            return os.nice(0), os.getcwd(), helper_mod.VALUE, scoop.DEBUG
        if __name__ == "__main__":
            print(sorted(set(futures.map(probe, range(20)))))
    """)
    out = run_scoop("-n", "2", "--nice", "5", "--path", str(workdir), "--pythonpath",
                    str(libdir), "--debug", prog)
    assert out.returncode == 0, out.stderr
    results = eval(out.stdout)  # noqa: S307 - our own program's output
    base = os.nice(0)
    assert results == [(base + 5, str(workdir), 42, True)]


def test_python_executable_option(tmp_path):
    wrapper = tmp_path / "mypython"
    marker = tmp_path / "used"
    wrapper.write_text(f"#!/bin/sh\necho yes >> {marker}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    prog = write_program(tmp_path, "if __name__ == '__main__':\n    print('hi')\n")
    out = run_scoop("-n", "2", "--python-interpreter", str(wrapper), prog)
    assert out.returncode == 0, out.stderr
    assert marker.read_text().count("yes") == 2
    bad = run_scoop("-n", "1", "--python-executable", str(tmp_path / "nopython"), prog)
    assert bad.returncode == 1
    assert "cannot start a worker" in bad.stderr and "--python-executable" in bad.stderr


def test_log_file_and_verbosity(tmp_path):
    prog = write_program(tmp_path, "if __name__ == '__main__':\n    print('hi')\n")
    logfile = tmp_path / "scoop.log"
    out = run_scoop("-n", "2", "-v", "--log", str(logfile), prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi"
    assert "started 2 workers" in logfile.read_text()
    quiet = run_scoop("-n", "2", "-q", prog)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_scoop_console_script(tmp_path):
    import sysconfig

    # The script of the interpreter running the tests, not the first "scoop" on PATH: that
    # may be another installation's (a pyenv shim, another venv or checkout), whose
    # launcher then starts workers that import this tree's scoop.
    exe = os.path.join(sysconfig.get_path("scripts"), "scoop")
    if not os.access(exe, os.X_OK):
        pytest.skip(f"no scoop console script at {exe} (package not installed here)")
    prog = write_program(tmp_path, """
        import sys
        from scoop import futures
        if __name__ == "__main__":
            sys.exit(sum(futures.map(abs, [-1, -2])))
    """)
    out = subprocess.run([exe, "-n", "2", prog], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr


def test_constants_reach_workers_that_join_later(tmp_path):
    prog = write_program(tmp_path, """
        import time
        from scoop import futures, shared
        def read(_):
            time.sleep(0.02)
            return shared.getConst("table", timeout=0)   # no waiting: must be there
        if __name__ == "__main__":
            shared.setConst(table={"k": "v"})        # before any worker has joined
            print(set(map(str, futures.map(read, range(40)))))
    """)
    out = run_scoop("-n", "3", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{\"{'k': 'v'}\"}"


def test_shutdown_waits_then_refuses_new_futures(tmp_path):
    prog = write_program(tmp_path, """
        import time
        from scoop import futures
        def slow(x):
            time.sleep(0.2)
            return x
        if __name__ == "__main__":
            futs = [futures.submit(slow, i) for i in range(4)]
            futures.shutdown(wait=True)
            print(all(f.done() for f in futs), [f.result() for f in futs])
            try:
                futures.submit(slow, 9)
            except RuntimeError as exc:
                print("refused:", exc)
    """)
    out = run_scoop("-n", "2", prog)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "True [0, 1, 2, 3]",
        "refused: cannot submit new futures after futures.shutdown()"]


@pytest.mark.parametrize("encrypt, hosts, external, tunnel, launcher, expected", [
    (None, [("127.0.0.1", 2)], 0, False, "ssh", False),   # all local: loopback only
    (None, [("127.0.0.1", 1), ("sct1", 1)], 0, False, "ssh", True),  # across hosts
    (None, [("127.0.0.1", 1), ("sct1", 1)], 0, True, "ssh", False),  # inside ssh tunnels
    (None, [("127.0.0.1", 1)], 2, False, "ssh", True),    # joiners from anywhere
    (None, [("127.0.0.1", 1)], 2, True, "ssh", True),
    (None, [("127.0.0.1", 1)], 0, False, "srun", True),
    (True, [("127.0.0.1", 2)], 0, False, "ssh", True),    # --encrypt
    (False, [("127.0.0.1", 1), ("sct1", 1)], 0, False, "ssh", False),  # --no-encrypt
])
def test_jobs_are_encrypted_when_workers_may_connect_from_elsewhere(
        encrypt, hosts, external, tunnel, launcher, expected):
    from scoop._launch.job import wants_encryption

    assert wants_encryption(encrypt, hosts, external, tunnel, launcher) is expected


def test_cpu_counts_of_many_bare_hosts_are_asked_in_parallel(tmp_path):
    """10,000 bare names once meant 10,000 ssh calls one after another."""
    from scoop._launch.cli import _parse, job_hosts

    seen = tmp_path / "seen"
    fake_ssh = tmp_path / "ssh"
    fake_ssh.write_text(f"""#!/bin/sh
touch {tmp_path}/run.$$
sleep 0.2
ls {tmp_path} | grep -c '^run\\.' >> {seen}
rm {tmp_path}/run.$$
echo 2
""")
    fake_ssh.chmod(0o755)
    names = [f"node{i:04d}" for i in range(200)]
    (tmp_path / "hosts").write_text("\n".join(names) + "\n")
    ns = _parse(["--hostfile", str(tmp_path / "hosts"), "--ssh-executable", str(fake_ssh),
                 "prog.py"])
    assert job_hosts(ns) == [(name, 2) for name in names]
    assert max(int(n) for n in seen.read_text().split()) > 1, "the probes ran one by one"


@pytest.mark.parametrize("said", [
    "srun: error: Unable to allocate resources: Unable to contact slurm controller "
    "(connect failure)",
    "srun: fatal: Could not establish a configuration source",
])
def test_an_srun_that_finds_no_controller_points_at_launcher_ssh(said):
    """What srun (slurm 22.05) prints without a controller, from a real process: the
    launcher's error names the cause and the way out (--launcher ssh)."""
    from scoop._errors import LaunchError
    from scoop._launch.job import Job
    from scoop._launch.remote import RemoteHost

    job = Job(hosts=(("127.0.0.1", 1),))
    host = RemoteHost("srun", [1], ["sh", "-c", f"echo '{said}' >&2; exit 1"], job)
    host.proc.wait(10)
    with pytest.raises(LaunchError) as err:
        host.check_failed()
    host.close()
    assert "could not reach a SLURM controller" in str(err.value)
    assert "--launcher ssh" in str(err.value) and said in str(err.value)


def test_more_local_workers_than_a_fork_batch(tmp_path):
    """Forks are requested FORK_BATCH at a time, the root's last: every worker of a job
    bigger than a batch starts, from the one template, and runs tasks."""
    from scoop._launch.template import FORK_BATCH

    n = FORK_BATCH + 8
    prog = write_program(tmp_path, """
        import os, sys, time
        import scoop
        from scoop import futures
        def where():
            time.sleep(0.05)  # so that the first workers cannot take every task
            return scoop.worker, os.getppid()
        if __name__ == "__main__":
            n, seen, parents = int(sys.argv[1]), set(), set()
            while len(seen) < n:
                for wid, ppid in [f.result() for f in
                                  [futures.submit(where) for _ in range(2 * n)]]:
                    seen.add(wid)
                    parents.add(ppid)
            print(sorted(seen) == list(range(n)), len(parents | {os.getppid()}))
    """)
    out = run_scoop("-n", str(n), prog, str(n), timeout=80)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "1"]  # all of them, one template's children
    assert not wait_no_processes(timeout=15)


def test_workers_forked_from_the_launcher_keep_none_of_its_descriptors(tmp_path):
    """`python -m scoop` forks its workers' template from itself: a descriptor its caller
    gave it (a pipe here) does not reach them, as with a spawned interpreter; the
    workers and the template say what they are in their process name."""
    prog = write_program(tmp_path, """
        import os, sys, time
        from scoop import futures
        def probe(fd, pipe):
            time.sleep(0.02)  # so that every worker takes some
            try:
                held = os.readlink(f"/proc/self/fd/{fd}") == pipe
            except OSError:
                held = False
            with open("/proc/self/comm") as me, open(f"/proc/{os.getppid()}/comm") as up:
                return held, me.read().strip(), up.read().strip()
        if __name__ == "__main__":
            fd, pipe = int(sys.argv[1]), sys.argv[2]
            print(sorted(set(futures.map(probe, [fd] * 30, [pipe] * 30))))
    """)
    r, w = os.pipe()
    try:
        pipe = os.readlink(f"/proc/self/fd/{w}")
        out = subprocess.run([sys.executable, "-m", "scoop", "-n", "3", prog, str(w), pipe],
                             pass_fds=(w,), capture_output=True, text=True, timeout=60)
    finally:
        os.close(w)
        os.close(r)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[(False, 'scoop-worker', 'scoop-template')]"
