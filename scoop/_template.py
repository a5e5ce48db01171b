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

This module stays out of ``scoop._launch``, whose package imports the launcher and the
broker: a template needs neither, and every import here is paid once per job.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading

# The largest message on the template's socket: a request or a report is a short JSON.
MAX_MESSAGE = 4096


def send(sock: socket.socket, body: dict, fds: list[int] = ()) -> None:
    """One message on the template's socket, with descriptors to pass if any."""
    data = json.dumps(body).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


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
