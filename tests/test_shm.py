"""Large arguments and results through shared memory (scoop/_shm.py), on real jobs.

Big numpy arrays, bytes and bytearrays round-trip exactly through submit, map and nested
tasks; a SIGKILLed worker holding a segment: the job finishes and /dev/shm is clean after
it; a SIGKILLed launcher: clean once its workers are gone; a job spanning two hosts
(ssh test hosts, root only) sends frames. No file of a test's job is left in /dev/shm.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from scoop import _reaper, _shm
from scoop._launch.job import Job

from conftest import run_scoop, up_test_hosts, wait_no_processes, write_program

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers"),
              pytest.mark.skipif(not _shm.available(), reason="no /dev/shm here")]
np = pytest.importorskip("numpy")


def segments_of(job: str) -> list[str]:
    return sorted(n for n in os.listdir(_shm.DIR) if n.startswith(f"scoop-{job}-"))


def job_line(stdout: str) -> str:
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("job "))


ROUND_TRIP = """
    import os, numpy as np
    from scoop import futures

    def double(a):
        return a * 2

    def flip(b):
        return b[::-1]

    def grow(b):
        out = bytearray(b)
        out.extend(b"!")
        return out

    def outer(a):
        # a worker's own task with a big argument; its big result comes back here
        inner = futures.submit(double, a + 1).result()
        return inner - 1

    if __name__ == "__main__":
        job = os.environ["SCOOP_JOB"]
        arrays = [np.arange(i, i + 400_000, dtype=np.float64) for i in range(6)]
        got = [f.result() for f in [futures.submit(double, a) for a in arrays]]
        assert all(np.array_equal(g, double(a)) for g, a in zip(got, arrays))
        got[0][0] = -1.0  # a result is writable, as after a plain pickle round trip
        assert all(np.array_equal(g, double(a))
                   for g, a in zip(futures.map(double, arrays), arrays))
        nested = list(futures.map(outer, arrays))
        assert all(np.array_equal(g, outer(a)) for g, a in zip(nested, arrays))
        raw = os.urandom(3_000_000)
        assert futures.submit(flip, raw).result() == flip(raw)
        assert futures.submit(grow, bytearray(raw)).result() == grow(bytearray(raw))
        # the root's argument segments wait in its pool for the next group
        used = any(n.startswith(f"scoop-{job}-") for n in os.listdir("/dev/shm"))
        print("job", job, "used", used, flush=True)
"""


def test_big_values_round_trip_through_shared_memory(tmp_path):
    out = run_scoop("-n", "3", write_program(tmp_path, ROUND_TRIP))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[2:] == ["used", "True"], out.stdout
    assert segments_of(job_line(out.stdout)) == []


VICTIM = """
    import os, signal, sys, time, numpy as np, scoop
    from scoop import futures

    MARK = sys.argv[1]

    def total(a):
        return float(a.sum())

    def victim(a, i):
        time.sleep(0.05)
        if scoop.worker != 0 and not os.path.exists(MARK):
            held = futures.submit(total, a + 1)  # an argument segment of its own
            futures.wait([held], timeout=0)  # ships it: the segment is written
            with open(MARK + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(MARK + ".tmp", MARK)
            os.kill(os.getpid(), signal.SIGKILL)
        return float(a.sum()) + i

    if __name__ == "__main__":
        job = os.environ["SCOOP_JOB"]
        arrays = [np.full(300_000, i, dtype=np.float64) for i in range(8)]
        for _ in range(50):  # until a worker other than the root took one
            fs = [futures.submit(victim, a, i) for i, a in enumerate(arrays)]
            assert [f.result() for f in fs] == [float(a.sum()) + i
                                                for i, a in enumerate(arrays)]
            if os.path.exists(MARK):
                break
        dead = open(MARK).read()
        held = [n for n in os.listdir("/dev/shm") if n.startswith(f"scoop-{job}-{dead}-")]
        print("job", job, "held", len(held), flush=True)
"""


def test_a_sigkilled_worker_holding_a_segment(tmp_path):
    """Its tasks run again elsewhere (their argument segments are still there), and the
    segment it made is gone with the job."""
    mark = tmp_path / "killed"
    out = run_scoop("-n", "3", write_program(tmp_path, VICTIM), str(mark))
    assert out.returncode == 0, out.stderr
    assert "was killed by SIGKILL" in out.stderr
    assert out.stdout.split()[2:] == ["held", "1"], out.stdout
    assert segments_of(job_line(out.stdout)) == []


HOLDER = """
    import os, time, numpy as np, scoop
    from scoop import futures

    def total(a):
        return float(a.sum())

    def hold(a):
        f = futures.submit(total, a + 1)  # an argument segment of this worker's own
        futures.wait([f], timeout=0)
        time.sleep(100)

    if __name__ == "__main__":
        print("job", os.environ["SCOOP_JOB"], flush=True)
        arrays = [np.full(300_000, i, dtype=np.float64) for i in range(6)]
        futures.wait([futures.submit(hold, a) for a in arrays])
"""


def test_a_sigkilled_launcher_leaves_nothing_once_its_workers_are_gone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "3",
                             write_program(tmp_path, HOLDER)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = job_line(proc.stdout.readline())
        deadline = time.monotonic() + 60
        # segments made by at least two processes: the root and another worker
        while len({n.split("-")[2] for n in segments_of(job)}) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Every process of this test run: workers forked from the launcher show its
    # environment in /proc, not the job's mark (their children get the mark).
    assert wait_no_processes(timeout=30) == {}, "the workers outlived their launcher"
    assert segments_of(job) == []


SPAN = """
    import os, time, numpy as np, scoop
    from scoop import futures

    def double(a):
        time.sleep(0.05)
        return a * 2, scoop.worker

    if __name__ == "__main__":
        arrays = [np.arange(i, i + 400_000, dtype=np.float64) for i in range(8)]
        for _ in range(50):  # until the remote worker ran some
            got = list(futures.map(double, arrays, chunksize=1))
            assert all(np.array_equal(g, a * 2) for (g, _), a in zip(got, arrays))
            if any(w == 1 for _, w in got):
                break
        else:
            raise AssertionError("the remote worker ran no task")
        mine = f"scoop-{os.environ['SCOOP_JOB']}-"
        print("segments", sum(n.startswith(mine) for n in os.listdir("/dev/shm")))
"""


def test_a_job_spanning_two_hosts_sends_frames(tmp_path):
    with up_test_hosts(1) as hosts:
        name = hosts.names[0]
        out = run_scoop("--hosts", "127.0.0.1", name, "--ssh-executable",
                        str(hosts.ssh_wrapper), write_program(tmp_path, SPAN))
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["segments", "0"], out.stdout
    assert wait_no_processes() == {}


# -- the module on its own (real files in /dev/shm, no job) --------------------------------

def test_only_a_job_on_one_host_uses_shared_memory():
    assert Job(hosts=(("127.0.0.1", 2),)).shm is not None
    assert Job(hosts=(("127.0.0.1", 1),), external=2).shm is None
    assert Job(hosts=(("127.0.0.1", 1), ("192.0.2.7", 1))).shm is None
    assert Job(hosts=(("127.0.0.1", 2),), launcher="srun").shm is None


def test_pooled_segments_are_reused_and_a_late_copy_fails():
    job = _reaper.new_job_id()
    pool = _shm.Pool(job)
    try:
        big = np.arange(300_000, dtype=np.float64)
        frames, lease = pool.place([b"\x80\x05small", memoryview(big)], tasks=2)
        assert _shm.is_placed(frames) and lease is not None
        restored = _shm.restore(frames)
        assert bytes(restored[0]) == b"\x80\x05small"
        assert np.array_equal(np.frombuffer(restored[1], np.float64), big)
        lease.release()
        assert pool.free == []  # one task of the group is still running
        lease.release()
        assert len(pool.free) == 1
        again, lease = pool.place([b"\x80\x05", memoryview(big + 1)], tasks=1)
        assert len(segments_of(job)) == 1  # the same segment, reused
        with pytest.raises(ValueError, match="reused"):
            _shm.restore(frames)  # the first group's frames: a late duplicate
        assert np.array_equal(np.frombuffer(_shm.restore(again)[1], np.float64), big + 1)
        pool.close()  # leased segments too
        assert segments_of(job) == []
        lease.release()  # a release after the close is a no-op
    finally:
        pool.close()
    assert segments_of(job) == []


def test_result_segments_are_unlinked_once_mapped():
    job = _reaper.new_job_id()
    data = os.urandom(2 << 20)
    frames = _shm.place_results([b"\x80\x05", data], job)
    assert len(segments_of(job)) == 1
    restored = _shm.restore(frames, unlink_after=True)
    assert segments_of(job) == []
    assert bytes(restored[1]) == data  # still mapped after the unlink
    restored[1][0:1] = b"x"  # private and writable


def test_stale_sweep_spares_live_jobs():
    job = _reaper.new_job_id()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = _shm.segment_name(job, int(dead.stdout), 1)
    mine = _shm.write_once(b"x", job)[0]  # made by this live process
    open(os.path.join(_shm.DIR, stale), "wb").close()
    try:
        _shm.sweep_stale()
        assert segments_of(job) == [mine]
    finally:
        _shm.sweep_job(job)


@pytest.fixture
def tiny_shm(tmp_path):
    """A real 2 MiB tmpfs as the segments' directory (root only; skipped elsewhere)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "shm"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    old, _shm.DIR = _shm.DIR, str(where)
    try:
        yield where
    finally:
        _shm.DIR = old
        subprocess.run(["umount", "-l", str(where)], check=True)  # -l: a failed test's
        # segments may still be mapped


def test_a_full_dev_shm_falls_back_to_frames(tiny_shm):
    job = _reaper.new_job_id()
    big = os.urandom(3 << 20)  # more than the tmpfs holds
    pool = _shm.Pool(job)
    assert pool.idle_max == 256 << 10  # an eighth of it
    frames, lease = pool.place([b"\x80\x05", big], tasks=1)
    assert lease is None and frames[1] is big
    assert _shm.place_results([b"\x80\x05", big], job)[1] is big
    assert os.listdir(tiny_shm) == []  # nothing half-written is left
    small = os.urandom(300 << 10)  # fits, but more than 1/8 of it: not kept once done
    frames, lease = pool.place([b"\x80\x05", small], tasks=1)
    assert lease is not None and len(os.listdir(tiny_shm)) == 1
    lease.release()
    assert os.listdir(tiny_shm) == [] and pool.free == []
    pool.close()
