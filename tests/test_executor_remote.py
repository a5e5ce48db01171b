"""scoop.Executor gets its workers every way the launcher does: over ssh (``hosts=``,
``hostfile=``; the real sshd test hosts of tests/testhosts.py), from the batch allocation
it runs in (an srun stand-in inside a SLURM-like allocation), and from another launcher
through a job file (``python -m scoop.join``)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import cloudpickle
import pytest
from test_join import SRUN_STAND_IN
from test_remote import _assert_namespaces_empty, _host_ns, _netns, _ssh, hosts  # noqa: F401

import scoop
from scoop import futures

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]


def netns(_) -> str:
    time.sleep(0.05)
    return os.readlink("/proc/self/ns/net")


def who(_) -> tuple[int, int]:
    time.sleep(0.02)
    return scoop.worker, os.getpid()


def test_hosts_over_ssh(hosts):  # noqa: F811 - the fixture
    a, b = hosts.names[:2]
    with scoop.Executor(hosts=[a, b], ssh=_ssh(hosts)) as pool:
        assert pool.size == 2
        seen = set(pool.map(netns, range(40), chunksize=1))
        assert set(futures.map(netns, range(20), chunksize=1)) <= seen  # inside `with`
    assert seen == {_host_ns(hosts, a), _host_ns(hosts, b)}
    _assert_namespaces_empty(hosts)


def shout(x: int) -> int:
    print(f"out {x} from {os.readlink('/proc/self/ns/net')}")  # no flush: as users print
    print(f"err {x}", file=sys.stderr)
    return x


def _wait_for(text: str, stream: io.StringIO, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while text not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    return stream.getvalue()


def test_what_remote_workers_print_reaches_a_replaced_sys_stdout(hosts, monkeypatch):  # noqa: F811
    """As in a notebook kernel, whose sys.stdout/sys.stderr are not descriptors 1 and 2:
    what a task prints on a host started over ssh is relayed to them, as it comes."""
    a = hosts.names[0]
    where = _host_ns(hosts, a)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with scoop.Executor(hosts=[a], ssh=_ssh(hosts)) as pool:
        assert pool.submit(shout, 1).result() == 1
        assert f"out 1 from {where}\n" in _wait_for("out 1", out)  # before the pool ends
        assert "err 1\n" in _wait_for("err 1", err)
        assert list(pool.map(shout, [2, 3])) == [2, 3]
    assert {"out 2", "out 3"} <= {line[:5] for line in out.getvalue().splitlines()}
    _assert_namespaces_empty(hosts)


NOTEBOOK_CELLS = [
    """import os, time, scoop
pool = scoop.Executor(hosts=[{host!r}], ssh={ssh!r})""",
    """def shout(x):
    print("printed on", os.readlink("/proc/self/ns/net"))  # on the remote host
    return x

pool.submit(shout, 1).result()
time.sleep(1)""",
    "pool.shutdown()",
]


def test_what_remote_workers_print_shows_in_the_notebook_cell(hosts, tmp_path):  # noqa: F811
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient: pip install -e '.[test]'")
    pytest.importorskip("ipykernel", reason="needs ipykernel: pip install -e '.[test]'")
    a = hosts.names[0]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src.format(host=a, ssh=_ssh(hosts)))
                for src in NOTEBOOK_CELLS]
    nbclient.NotebookClient(nb, timeout=90, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(out.get("text", "") for out in nb.cells[1].outputs
                      if out.output_type == "stream" and out.name == "stdout")
    assert printed == f"printed on {_host_ns(hosts, a)}\n"
    _assert_namespaces_empty(hosts)


def test_hostfile_with_this_machine_and_a_remote_host(hosts, tmp_path):  # noqa: F811
    c = hosts.names[2]
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"127.0.0.1 1\n{c} 2\n")
    with scoop.Executor(hostfile=str(hostfile), ssh=_ssh(hosts)) as pool:
        assert pool.size == 3
        seen = set(pool.map(netns, range(60), chunksize=1))
    assert seen == {_netns(), _host_ns(hosts, c)}
    _assert_namespaces_empty(hosts)


def test_workers_join_through_the_job_file(tmp_path):
    job_file = tmp_path / "job.json"
    joiners = []
    try:
        with scoop.Executor(external=2, job_file=str(job_file),
                            broker_hostname="127.0.0.1") as pool:
            assert pool.job_file == str(job_file) and pool.size == 2
            joiners = [subprocess.Popen([sys.executable, "-m", "scoop.join", str(job_file)],
                                        stderr=subprocess.PIPE, text=True) for _ in range(2)]
            seen, deadline = set(), time.monotonic() + 40
            while len(seen) < 2 and time.monotonic() < deadline:
                seen |= {wid for wid, _ in pool.map(who, range(20), chunksize=1)}
            assert seen == {1, 2}
        for j in joiners:
            j.wait(15)
            assert j.returncode == 0, j.stderr.read()
        assert not job_file.exists(), "the job file outlived the pool"
    finally:
        for j in joiners:
            if j.poll() is None:
                j.kill()
                j.wait()


def test_batch_allocation_with_srun(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    srun = bindir / "srun"
    srun.write_text(SRUN_STAND_IN)
    srun.chmod(0o755)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SRUN_LOG", str(tmp_path / "srun.log"))
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "3")
    monkeypatch.setenv("HOME", str(tmp_path))
    with scoop.Executor() as pool:
        assert pool.size == 3  # the allocation's slots: the caller runs no task
        seen, deadline = set(), time.monotonic() + 40
        while len(seen) < 3 and time.monotonic() < deadline:
            seen |= {wid for wid, _ in pool.map(who, range(30), chunksize=1)}
        assert seen == {1, 2, 3}
    step = (tmp_path / "srun.log").read_text()
    assert step.startswith("srun 3: ") and "-m scoop.join" in step
    assert not list((tmp_path / ".scoop" / "jobs").iterdir()), "job file left behind"
