"""Attacks on a running job, found in an attack round (issue 9): each must leave the job
and its result intact. Real launcher, real sockets; the attacker is this test process.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import cloudpickle
import pytest
import zmq

from conftest import write_program

# Pool workers cannot import test modules: this module's functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_leftovers")]

SLOW_MAPS = """
    import os, sys, time
    from scoop import futures

    def f(x):
        time.sleep(0.005)
        return x * x

    if __name__ == "__main__":
        print("started", flush=True)
        while not os.path.exists(sys.argv[1]):  # until the attack is in place
            time.sleep(0.05)
        sums = {sum(futures.map(f, range(60))) for _ in range(30)}
        print("sums", sorted(sums), flush=True)
"""


def listening_ports(pid: int) -> list[int]:
    """TCP ports a process listens on, read from /proc (no tool needed)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start_job(tmp_path, source: str, nofile: int):
    prog = write_program(tmp_path, source)
    limit = (nofile, nofile)
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "2", prog, str(go)],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limit))
    assert proc.stdout.readline().strip() == "started"
    return proc, go


def test_floods_at_a_low_open_file_limit_do_not_end_the_job(tmp_path):
    """With the launcher at 256 open files (soft and hard), idle TCP connections and
    DEALERs with a wrong token exhaust its descriptors: the broker goes on routing, and
    the job ends with the right result and status 0."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the attacker needs 2000 open files; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2000), hard))
    proc, go = start_job(tmp_path, SLOW_MAPS, 256)
    ctx = zmq.Context()
    raw, dealers = [], []
    try:
        (port,) = listening_ports(proc.pid)
        for _ in range(600):  # more than the launcher may hold
            try:
                raw.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                break  # the backlog is full: the point is made
        for i in range(300):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.plain_username, s.plain_password = b"scoop", b"wrong%d" % i
            s.connect(f"tcp://127.0.0.1:{port}")
            dealers.append(s)
        go.touch()
        out, err = proc.communicate(timeout=90)
    finally:
        for s in raw:
            s.close()
        for s in dealers:
            s.close(0)
        ctx.destroy(linger=0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"sums [{sum(x * x for x in range(60))}]", err
    assert len(raw) > 200, "the flood did not reach the launcher's limit"
    assert "Traceback" not in err, err


def test_a_connection_that_never_finishes_the_handshake_is_dropped(monkeypatch):
    """An idle TCP connection holds one of the broker's descriptors only until the
    handshake timeout (a real broker, its timeout cut to 1 s for the test)."""
    from scoop import _broker, _transport

    monkeypatch.setattr(_transport, "HANDSHAKE_TIMEOUT_MS", 1000)
    broker = _broker.Broker(_transport.Credentials.new()).start()
    try:
        host, port = broker.address[6:].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.settimeout(30)  # socket.timeout: not dropped
            started = time.monotonic()
            received = b""
            while chunk := conn.recv(4096):  # the broker's greeting, then its end of stream
                received += chunk
            waited = time.monotonic() - started
    finally:
        broker.stop()
    assert received.startswith(b"\xff"), "not a ZeroMQ greeting: the test reached no broker"
    assert waited >= 0.9, f"dropped after {waited:.2f} s, before the handshake timeout"


def test_the_soft_open_file_limit_is_raised_to_the_hard_one():
    code = ("import resource; from scoop._transport import raise_open_file_limit; "
            "print(raise_open_file_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, preexec_fn=lambda: resource.setrlimit(
                              resource.RLIMIT_NOFILE, (64, 1000)))
    assert proc.stdout.split() == ["1000", "1000"], proc.stderr


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident size


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _square(x):
    return x * x


def test_a_token_holder_sending_huge_forged_messages_is_dropped_cheaply(pool):
    """Someone who read the PLAIN token off the network passes the handshake, but not the
    signature check: messages with a huge header or payload are dropped without being
    copied or hashed, so the broker's memory stays bounded and the job goes on."""
    from scoop import _protocol as P
    from scoop import futures

    ctx = zmq.Context()
    big = bytearray(60 * 2**20)
    senders = []
    try:
        for _ in range(4):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.plain_username, s.plain_password = b"scoop", pool.creds.token
            s.connect(pool.broker.address)
            senders.append(s)
        results = futures.map(_square, range(2000))
        _peak_rss_reset()
        before = _peak_rss()
        for i in range(15):
            for s in senders:
                forged = ([os.urandom(32), P.TASKS, big] if i % 2 else
                          [os.urandom(32), P.TASKS, os.urandom(40), big])
                s.send_multipart(forged, copy=False)
        assert list(results) == [x * x for x in range(2000)]
        # Every forged message has reached the broker once a message sent after them has
        # been refused: a frame over the limit, which disconnects the sender.
        for s in senders:
            mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            s.send_multipart([os.urandom(32), P.TASKS, bytearray(P.MAX_FRAME_BYTES + 1)])
            assert mon.poll(60_000), "the broker never got to the end of the forged messages"
            s.disable_monitor()
            mon.close(0)
        grew = _peak_rss() - before
    finally:
        for s in senders:
            s.close(0)
        ctx.destroy(linger=0)
    # 60 forged messages of 60 MiB on 4 connections took 1.7 GiB when they were copied
    # and hashed; dropped by their envelope, what is left is ZeroMQ's receive buffers.
    assert grew < 1200 * 2**20, f"the broker's process grew by {grew / 2**20:.0f} MiB"
    assert list(futures.map(_square, range(10))) == [x * x for x in range(10)]


def test_a_hostile_scheduler_node_list_never_reaches_ssh(tmp_path):
    """``SLURM_JOB_NODELIST='-oProxyCommand=...'`` without task counts once made the CPU
    count probe run the command through ssh. Now the name is refused first."""
    marker = tmp_path / "ran"
    prog = write_program(tmp_path, "print('ran')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_",
                                                                      "PE_", "LSB_"))}
    env["SLURM_JOB_NODELIST"] = f"-oProxyCommand=touch${{IFS}}{marker}"
    proc = subprocess.run([sys.executable, "-m", "scoop", prog], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "SLURM_JOB_NODELIST" in proc.stderr and "cannot start with '-'" in proc.stderr
    assert "ran" not in proc.stdout and not marker.exists()


def test_a_replayed_join_is_answered_once_whatever_the_connection(pool, caplog):
    """A JOIN read off the network and replayed from fresh connection names (each with
    its own replay window) once took a new worker id each time."""
    from scoop import _protocol as P

    join = P.Codec(pool.creds.key, P.ANY_WORKER).encode(P.JOIN)
    ctx = zmq.Context()
    answers = []
    try:
        with caplog.at_level("WARNING", logger="scoop"):
            for _ in range(5):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.IDENTITY, P.routing_id(b"j", 0))
                s.plain_username, s.plain_password = b"scoop", pool.creds.token
                s.connect(pool.broker.address)
                s.send_multipart(join)
                if s.poll(1000 if answers else 10_000):
                    answers.append(P.Codec(pool.creds.key, 0).decode(s.recv_multipart()))
                s.close(0)
    finally:
        ctx.destroy(linger=0)
    assert [m.kind for m in answers] == [P.ASSIGN]
    assert any("replayed JOIN" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("what", ["hostfile", "program", "pbs"])
@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_fifo_or_device_as_input_is_refused_at_once(tmp_path, what, special):
    """A FIFO once hung the launcher at open(); /dev/zero was read without limit."""
    path = "/dev/zero"
    if special == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    prog = write_program(tmp_path, "print('ran')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_",
                                                                      "PE_", "LSB_"))}
    argv = {"hostfile": ["--hostfile", path, prog], "program": [path], "pbs": [prog]}[what]
    if what == "pbs":
        env["PBS_NODEFILE"] = path
    proc = subprocess.run([sys.executable, "-m", "scoop", *argv], capture_output=True,
                          text=True, timeout=30, env=env)
    assert proc.returncode != 0 and "ran" not in proc.stdout
    assert "not a regular file" in proc.stderr, proc.stderr


def test_the_log_file_is_private(tmp_path):
    prog = write_program(tmp_path, "print('ran')\n")
    log = tmp_path / "job.log"
    proc = subprocess.run([sys.executable, "-m", "scoop", "-n", "2", "-vv", "--log", str(log),
                           prog], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert log.stat().st_mode & 0o777 == 0o600
    assert "started 2 workers" in log.read_text()


def _break_off_a_handshake(address: str) -> None:
    """Connect over TCP, send half of a ZeroMQ greeting, hang up."""
    host, port = address[6:].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"\xff" + b"\0" * 8 + b"\x7f\x03")


@pytest.mark.parametrize("stopping", [False, True])
def test_a_handshake_broken_off_is_reported_only_while_the_job_runs(stopping, caplog):
    """A peer that hangs up mid-handshake is reported once the grace period is over, if
    the job still runs then; once it stops, such peers were its own workers, ended as they
    connected (a root whose program fails at once): counted, no warning. A real broker
    socket and gate; the peer is a real TCP connection."""
    from scoop._transport import BROKEN_OFF_GRACE_S, Credentials, Gate

    ctx = zmq.Context()
    try:
        creds = Credentials.new()
        gate = Gate(ctx, creds)
        router, address = creds.listen(ctx, "127.0.0.1", 0)
        gate.watch(router)
        poller = zmq.Poller()
        for sock in gate.sockets:
            poller.register(sock, zmq.POLLIN)
        _break_off_a_handshake(address)
        with caplog.at_level("WARNING", logger="scoop"):
            deadline = time.monotonic() + 10
            while not gate._broken_off and time.monotonic() < deadline:
                for sock in dict(poller.poll(100)):
                    gate.handle(sock)
            assert gate._broken_off, "the monitor never reported the broken-off handshake"
            gate.settle(time.monotonic())
            assert gate.refused == 0 and gate._broken_off  # in its grace: not yet reported
            gate.stopping = stopping
            gate.settle(time.monotonic() + BROKEN_OFF_GRACE_S)
        warned = [r.getMessage() for r in caplog.records if "broke off" in r.getMessage()]
        assert gate.refused == 1 and not gate._broken_off
        assert len(warned) == (0 if stopping else 1), warned
        gate.close()
        router.close(0)
    finally:
        ctx.destroy(linger=0)


def test_a_worker_proven_before_the_monitor_says_accepted_is_never_hung_up():
    """The broker reads its router before the gate's monitor, so a worker's first signed
    message may be seen before the event that its connection was accepted. That late
    event must not count the connection as unproven: when a flood pushes the unproven
    over the bound, the oldest are hung up, and a worker's messages in flight on its
    connection would be lost (a job hung under the low open-file-limit flood). Real
    router, gate and worker socket; the bound is 0, so any unproven one is hung up."""
    from scoop._broker import _source_fd
    from scoop._transport import Credentials, Gate

    ctx = zmq.Context()
    try:
        creds = Credentials.new()
        gate = Gate(ctx, creds, max_unproven=0)
        router, address = creds.listen(ctx, "127.0.0.1", 0)
        gate.watch(router)
        worker = creds.connect(ctx, b"w1", address)
        worker.send(b"hello")
        deadline = time.monotonic() + 10
        while not router.poll(50):  # answer the handshake check only, not the monitor
            gate.handle(gate.zap)
            assert time.monotonic() < deadline, "the worker's message never came"
        frames = router.recv_multipart(copy=False)
        gate.proven(_source_fd(frames[1]))
        while gate.monitor.poll(200) and time.monotonic() < deadline:
            gate.handle(gate.monitor)
        assert gate.hung_up == 0, "the worker's own connection was hung up"
        router.send_multipart([b"w1", b"still here"])
        assert worker.poll(5000) and worker.recv() == b"still here"
        worker.close(0)
        gate.close()
        router.close(0)
    finally:
        ctx.destroy(linger=0)
