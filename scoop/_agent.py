"""Starting worker processes on one host, and the agent that does it on remote hosts.

The launcher starts the workers of its own host with :func:`spawn_worker`. For every other
host it runs ``python -m scoop._start_host`` there over ssh: a small *host agent* that
reads its workers' configs on stdin (the job key never appears on a command line), starts
them with the same :func:`spawn_worker`, and watches them::

    launcher --ssh host--> agent (python -m scoop._start_host)
       stdin: one JSON line {"workers": [cfg, ...]}; then kept open
                            |-- worker 3  python -m scoop._start_worker  <- stdin: cfg
                            '-- worker 4  ...
       stdin closes (launcher gone, ssh cut) -> the agent kills its workers and exits
       every worker ended                     -> the agent exits: 0, or the root's status

Workers inherit the agent's stdout and stderr, so what they print travels back through
ssh to the launcher's terminal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

WORKER_MODULE = "scoop._start_worker"
# How long workers get after a stop request before they are killed.
STOP_GRACE_S = 3.0


class SpawnError(RuntimeError):
    """A worker process could not be started."""


def worker_env(pythonpath: str | None) -> dict[str, str]:
    """The environment of a worker: this one, with ``pythonpath`` prepended."""
    env = dict(os.environ)
    if pythonpath:
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = pythonpath + (os.pathsep + old if old else "")
    return env


def spawn_worker(cfg: dict, python: str, cwd: str, pythonpath: str | None = None,
                 **popen) -> subprocess.Popen:
    """Start one worker process and hand it its config on stdin."""
    cfg = dict(cfg, ppid=os.getpid(), die_with_parent=True)
    try:
        proc = subprocess.Popen([python, "-m", WORKER_MODULE], stdin=subprocess.PIPE,
                                cwd=cwd, env=worker_env(pythonpath), start_new_session=True,
                                **popen)
    except OSError as exc:
        raise SpawnError(f"cannot start a worker with {python!r}: {exc}. "
                         "Check --python-executable.") from exc
    proc.stdin.write(json.dumps(cfg).encode() + b"\n")
    proc.stdin.close()
    return proc


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


def main() -> None:
    """The host agent (``python -m scoop._start_host``)."""
    spec = json.loads(sys.stdin.readline())
    host = spec.get("host", "?")
    procs: dict[int, subprocess.Popen] = {}
    try:
        for cfg in spec["workers"]:
            procs[cfg["wid"]] = spawn_worker(cfg, spec.get("python") or sys.executable,
                                             spec.get("cwd") or os.getcwd(),
                                             spec.get("pythonpath"))
    except SpawnError as exc:
        print(f"scoop: on {host}: {exc}", file=sys.stderr, flush=True)
        reap(list(procs.values()), 0)
        sys.exit(127)
    gone = threading.Event()

    def watch_stdin() -> None:
        # EOF: the launcher is gone or the ssh connection was cut. A raw read: a daemon
        # thread blocked in the buffered reader would abort the interpreter's exit.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        gone.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    status = 0
    while not gone.is_set():
        if all(p.poll() is not None for p in procs.values()):
            break
        time.sleep(0.05)
    reap(list(procs.values()), 0.5 if gone.is_set() else STOP_GRACE_S)
    # The root's status is the job's; otherwise say whether any worker failed.
    codes = {wid: p.returncode for wid, p in procs.items() if p.returncode is not None}
    if 0 in codes:
        status = codes[0] if codes[0] >= 0 else 128 - codes[0]
    elif any(codes.values()):
        status = 1
    sys.exit(status)
