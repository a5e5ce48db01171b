"""Starting worker processes on one host, and the agent that does it on remote hosts.

The launcher starts the workers of its own host with :func:`spawn_worker`. For every other
host it runs ``python -m scoop._start_host`` there over ssh: a small *host agent* that
reads its workers' configs on stdin (the job key never appears on a command line), starts
them with the same :func:`spawn_worker`, and watches them::

    launcher --ssh host--> agent (python -m scoop._start_host)
       stdin: one JSON line {"workers": [cfg, ...]}; then kept open, carrying the
              launcher's stdin for a root worker here in frames (see write_frame)
                            |-- worker 3  python -m scoop._start_worker 5  <- fd 5: cfg
                            '-- worker 4  ...
       stdin closes (launcher gone, ssh cut) -> the agent kills its workers and exits
       the root here ended                    -> the agent stops the others, exits with
                                                 the root's status
       every worker ended                     -> the agent exits: 0, or 1 if one failed

Workers inherit the agent's stdout and stderr, so what they print travels back through
ssh to the launcher's terminal.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

from . import _reaper
from ._errors import SpawnError

WORKER_MODULE = "scoop._start_worker"
# How long workers get after a stop request before they are killed.
STOP_GRACE_S = 3.0


# The usual cause of a worker's death by each signal, for the message that reports it.
SIGNAL_CAUSES = {
    signal.SIGKILL: "out of memory? see `dmesg` (the kernel's OOM killer sends SIGKILL)",
    signal.SIGSEGV: "a crash in native code (an extension module)?",
    signal.SIGBUS: "a crash in native code, or a memory-mapped file that shrank?",
    signal.SIGABRT: "a failed assertion in native code?",
}


def describe_status(code: int) -> str:
    """``Popen.returncode`` in words: 'exit status 3' or 'killed by SIGKILL'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def shell_status(code: int) -> int:
    """A ``Popen.returncode`` as a shell would report it (128 + signal number)."""
    return 128 - code if code < 0 else code


def death_message(wid: int, pid: int, code: int) -> str:
    """How a worker ended, for a person: 'worker 2 (pid 12) ended early: exit status 3',
    'the root worker (worker 0, pid 11) was killed by SIGKILL: out of memory? ...'."""
    who = f"the root worker (worker 0, pid {pid})" if wid == 0 else f"worker {wid} (pid {pid})"
    if code >= 0:
        return f"{who} ended {'with' if wid == 0 else 'early:'} {describe_status(code)}"
    cause = SIGNAL_CAUSES.get(-code)
    return f"{who} was {describe_status(code)}" + (f": {cause}" if cause else "")


def worker_env(pythonpath: str | None) -> dict[str, str]:
    """The environment of a worker: this one, with ``pythonpath`` prepended."""
    env = dict(os.environ)
    if pythonpath:
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pythonpath + (os.pathsep + old if old else "")
    return env


def spawn_worker(cfg: dict, python: str, cwd: str, pythonpath: str | None = None,
                 stdin=subprocess.DEVNULL, **popen) -> subprocess.Popen:
    """Start one worker process and hand it its config on a pipe of its own.

    The pipe's descriptor number is the worker's only argument (the job key never shows
    in ``ps``), so its stdin is free: the root gets the job's (``stdin=None`` inherits
    this process's), the other workers an empty one.
    """
    cfg = dict(cfg, ppid=os.getpid(), die_with_parent=True)
    env = worker_env(pythonpath)
    if cfg.get("job"):
        env[_reaper.JOB] = cfg["job"]  # inherited by all the worker starts
    config_r, config_w = os.pipe()
    try:
        proc = subprocess.Popen([python, "-m", WORKER_MODULE, str(config_r)], stdin=stdin,
                                cwd=cwd, env=env, start_new_session=True,
                                pass_fds=(config_r,), **popen)
    except OSError as exc:
        os.close(config_w)
        raise SpawnError(f"cannot start a worker with {python!r}: {exc}. "
                         "Check --python-executable.") from exc
    finally:
        os.close(config_r)
    write_config(config_w, cfg)
    return proc


def write_config(fd: int, cfg: dict) -> None:
    """Write a worker's config on the pipe ``fd`` (closed after): one JSON line."""
    with open(fd, "wb") as f:
        try:
            f.write(json.dumps(cfg).encode() + b"\n")
        except BrokenPipeError:
            pass  # the worker died at once; its exit status tells why


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to a worker and everything it started (its own process group)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def reap(procs, grace: float) -> None:
    """Wait up to ``grace`` seconds for ``procs`` to end; then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for proc in alive:
            signal_group(proc, sig)
        for proc in alive:
            try:
                proc.wait(1.0)
            except subprocess.TimeoutExpired:
                pass


def write_frame(stream, data: bytes) -> None:
    """Send a piece of the root's stdin to an agent: a 4-byte length, then the bytes.
    An empty frame is the end of that input."""
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


class _Input:
    """The agent's stdin, read raw: a daemon thread blocked in Python's buffered reader
    would abort the interpreter's exit."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buf = b""

    def _fill(self) -> bool:
        """Read what is there into the buffer; False at the end of the stream."""
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            data = b""
        self.buf += data
        return bool(data)

    def _read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or None at the end of the stream."""
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def line(self) -> bytes:
        """The first line, without its newline; what follows stays buffered."""
        while b"\n" not in self.buf and self._fill():
            pass
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def frame(self) -> bytes | None:
        head = self._read(4)
        return None if head is None else self._read(struct.unpack(">I", head)[0])


def _feed_root(source: _Input, root_stdin, gone: threading.Event) -> None:
    """Pass the launcher's stdin frames on to the root; set ``gone`` at the real EOF
    (the launcher is gone or the ssh connection was cut)."""
    while (data := source.frame()) is not None:
        if root_stdin is None:
            continue
        try:
            if data:
                root_stdin.write(data)
                root_stdin.flush()
            else:
                root_stdin.close()
                root_stdin = None
        except (BrokenPipeError, ValueError):  # the root closed its stdin or ended
            root_stdin = None
    gone.set()


def _agent_mark(spec: dict) -> str:
    """The job mark of this agent's workers: the job's id and this agent, so that the
    agent ends only what it started, even on a machine the launcher (or another agent of
    the job) also runs on."""
    job = next((w.get("job") or "" for w in spec["workers"]), "")
    return f"{job}.agent{os.getpid()}" if job else ""


def _start_workers(spec: dict) -> dict[int, subprocess.Popen]:
    """Start the workers ``spec`` lists; the root's stdin is a pipe from the launcher."""
    procs: dict[int, subprocess.Popen] = {}
    mark = _agent_mark(spec)
    if spec.get("unbuffered"):  # the launcher relays their output as it comes
        os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        for cfg in spec["workers"]:
            cfg["job"] = mark
            relay = cfg["wid"] == 0 and spec.get("root_stdin")
            procs[cfg["wid"]] = spawn_worker(
                cfg, spec.get("python") or sys.executable, spec.get("cwd") or os.getcwd(),
                spec.get("pythonpath"), stdin=subprocess.PIPE if relay else subprocess.DEVNULL)
    except SpawnError as exc:
        print(f"scoop: on {spec.get('host', '?')}: {exc}", file=sys.stderr, flush=True)
        reap(list(procs.values()), 0)
        sys.exit(127)
    return procs


def main() -> None:
    """The host agent (``python -m scoop._start_host``)."""
    source = _Input()
    spec = json.loads(source.line())
    procs = _start_workers(spec)
    gone = threading.Event()
    root = procs.get(0)
    threading.Thread(target=_feed_root, args=(source, root and root.stdin, gone),
                     daemon=True).start()
    # The root's end is the job's: the others here need not wait for the broker's STOP.
    while not gone.is_set() and not (root and root.poll() is not None):
        if all(p.poll() is not None for p in procs.values()):
            break
        time.sleep(0.05)
    if root is not None and root.returncode is not None and root.returncode < 0:
        print(f"scoop: on {spec.get('host', '?')}: "
              f"{death_message(0, root.pid, root.returncode)}", file=sys.stderr, flush=True)
    reap(list(procs.values()), 0.5 if gone.is_set() else STOP_GRACE_S)
    # What tasks started and their workers did not end (a worker killed outright).
    _reaper.end_marked(_reaper.JOB, next((w["job"] for w in spec["workers"]), ""))
    # The root's status is the job's; otherwise say whether any worker failed.
    codes = {wid: p.returncode for wid, p in procs.items() if p.returncode is not None}
    if 0 in codes:
        sys.exit(shell_status(codes[0]))
    sys.exit(1 if any(codes.values()) else 0)
