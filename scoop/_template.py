"""The template process of a job's local workers: it forks them (the launcher's side, and
why, are in ``scoop._launch.template``).

::

    python -m scoop._start_worker FD, config {"template": true} on FD (a SEQPACKET socket)
      imports what a worker needs (scoop's runtime, ZeroMQ's module: no context, no thread)
      loop: a request {"wid"} + SCM_RIGHTS [config pipe, root's stdin?]
              -> fork(); the parent answers {"wid", "forked": pid}
              -> the child: a session of its own, its stdin, then back in
                 scoop._bootstrap.main to read its config from the pipe, as any worker
            a child ended (SIGCHLD) -> {"pid", "status"}
            EOF (the launcher is done or gone) -> exit; the workers left die with it
                                                  (their PDEATHSIG)

*Forked by the launcher.* ``python -m scoop`` forks its template from itself (no
interpreter to start, no import to repeat: :func:`become`), before any thread or ZeroMQ
context exists. Its workers' command line is then the launcher's (``ps``: ``python -m scoop
-n 4 prog.py``, as multiprocessing's forked workers show their parent's); their process
name (``/proc/PID/comm``: ``ps -o comm``, ``top``, ``pgrep``) says ``scoop-worker``, the
template's ``scoop-template``. Neither shows the job key.

This module stays out of ``scoop._launch``, whose package imports the launcher and the
broker: a template needs neither, and every import here is paid once per job.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import threading

# The largest message on the template's socket: a request or a report is a short JSON.
MAX_MESSAGE = 4096
# The process names (/proc/PID/comm, at most 15 bytes) of a template the launcher forked
# from itself, and of its workers: their command line is the launcher's.
TEMPLATE_NAME = b"scoop-template"
WORKER_NAME = b"scoop-worker"


def send(sock: socket.socket, body: dict, fds: list[int] = ()) -> None:
    """One message on the template's socket, with descriptors to pass if any."""
    data = json.dumps(body).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def become(fd: int, cwd: str, env: dict[str, str], pythonpath: str | None,
           ppid: int) -> int:
    """In a child the launcher (``ppid``) forked from itself: become the job's template on
    the socket ``fd``, set up as a spawned one would be (``scoop._launch.template``):
    a session of its own, no stdin, the workers' directory, environment and
    ``sys.path``, no handler or descriptor of the launcher's.

    Returns only in a forked worker, as :func:`serve`.
    """
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for handler in logging.root.handlers[:]:  # the launcher's (its --log file): a worker
        logging.root.removeHandler(handler)  # sets up its own
        handler.close()
    # Descriptors the launcher inherited (a caller's pipe) are not the workers'; Python
    # objects of the launcher that own one are closed above or by the caller. The open
    # ones are listed: a loop to the descriptor limit could take seconds (ulimit -n 1M).
    try:
        others = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        others = range(min(os.sysconf("SC_OPEN_MAX"), 65536))
    for other in others:
        if other > 2 and other != fd:
            try:
                os.close(other)
            except OSError:
                pass  # the listing's own descriptor, already closed
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(cwd)
    os.environ.update(env)
    # sys.path[0] as a spawned `python -m`'s: its directory (unless -P, Python 3.11+)
    if not getattr(sys.flags, "safe_path", False):
        sys.path[0] = cwd
    sys.path[1:1] = [d for d in (pythonpath or "").split(os.pathsep) if d]
    set_name(TEMPLATE_NAME)
    return serve(fd, {"ppid": ppid, "name": WORKER_NAME.decode()})


def set_name(name: bytes) -> None:
    """Set this process's name (``/proc/self/comm``); nothing where it cannot be set."""
    try:
        with open("/proc/self/comm", "wb") as f:
            f.write(name[:15])
    except OSError:
        pass


def serve(fd: int, cfg: dict) -> int:
    """Be the template on the socket ``fd`` until the launcher closes it (then exit).

    Returns only in a forked worker: the descriptor its config comes on.
    """
    # Imported once, for every worker: futures too, which nearly every program imports
    # and every map chunk runs through (~5 ms a worker otherwise).
    from . import _bootstrap, _watchdog, futures  # noqa: F401
    from ._runtime import link  # noqa: F401 - ZeroMQ's module, not a context

    _bootstrap._die_with_parent(cfg.get("ppid", 0))
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    while True:
        ready = select.select([sock, wake_r], [], [])[0]
        if wake_r in ready:
            os.read(wake_r, 512)
        _report(sock, _exits())
        if sock not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2)
        except OSError:
            data, fds = b"", []
        if not data:
            os._exit(0)  # the launcher is gone or done: the workers die with us
        request = json.loads(data)
        if threading.active_count() != 1:  # never fork a process with threads
            raise RuntimeError("the worker template has threads; it cannot fork")
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for own in (sock.detach(), wake_r, wake_w):
                os.close(own)
            if cfg.get("name"):
                set_name(cfg["name"].encode())
            return _become_worker(fds)
        for own in fds:
            os.close(own)
        _report(sock, [{"wid": request["wid"], "forked": pid}])


def _exits() -> list[dict]:
    """The children that ended since the last look, as reports."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if not pid:
            return out
        out.append({"pid": pid, "status": os.waitstatus_to_exitcode(status)})


def _report(sock: socket.socket, bodies: list[dict]) -> None:
    try:
        for body in bodies:
            send(sock, body)
    except OSError:  # the launcher hung up while a report was on its way: it is done
        os._exit(0)


def _become_worker(fds: list[int]) -> int:
    """In the forked child: a session of its own and its stdin, as ``spawn_worker``
    gives; returns the descriptor of its config."""
    os.setsid()
    config_fd, *stdin = fds
    if stdin:
        os.dup2(stdin[0], 0)
        os.close(stdin[0])
    else:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    sys.argv = [sys.argv[0], str(config_fd)]
    return config_fd
