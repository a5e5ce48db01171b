"""Local workers forked from a template process: one interpreter start and one round of
imports per job instead of one per worker (issue 12), as multiprocessing's forkserver.

::

    launcher (this module)                       template (scoop._template)
    ----------------------                       --------------------------
    Template(): spawn it, config {template}  ->  imports what a worker needs; no ZeroMQ
                (FD: a SEQPACKET socket)         context, no thread: safe to fork
    Template(here=True): python -m scoop     ->  a fork of the launcher, which has
      forks it before its broker starts          imported it all already (become)
    fork(wid, config): a pipe; its read end  ->  fork(); the child: own session, stdin
      (and the root's stdin) go as SCM_RIGHTS      (the root's, or /dev/null), then reads its
      config -> the pipe's write end               config on the pipe and runs as any worker
      (fork_many: up to FORK_BATCH requests
      at once, then their answers)
    Forked (a Popen to the launcher) <--------   {"wid", "forked": pid}
    poll / wait  <-----------------------------  {"pid", "status"}: a child ended (waitpid)
    close(): EOF  ---------------------------->  exits (its children die with it: PDEATHSIG)

*Why.* Each fresh interpreter pays its start and every import (scoop, ZeroMQ, greenlet,
cloudpickle): about 0.15 s of CPU per worker, seconds for 128 workers on 2 cores. A fork
of a process that has them all costs a few milliseconds.

*Forked from the launcher* (``python -m scoop``, :func:`_fork_here`): the template
costs no interpreter start and no import at all, as multiprocessing's fork (issue 12:
-n 2 start + one task + exit was ~3.7x ProcessPoolExecutor's, mostly the template's
interpreter). A library's pool (``Launcher(n).start(root_in_process=True)``,
``scoop.Executor``) still spawns it: its process may have threads and memory of its own.

*What stays as it was.* A forked worker runs the same start-up (``_bootstrap.start``) from
the same config, read from a pipe of its own (never from a command line); its command
line is the template's: ``-m scoop._start_worker FD`` when spawned, the launcher's when
forked from it (named ``scoop-worker`` then, see ``scoop._template``). A spawned
template gets the workers' environment from ``exec``, so ``/proc/<pid>/environ`` of every
worker carries the job's mark (``scoop._reaper``); a forked one sets it in its own
``os.environ``, which the processes its workers' tasks start inherit and show (the
template's and workers' own ``/proc/<pid>/environ`` show the launcher's environment).
Each worker asks for PDEATHSIG on its parent, the template, which
asks for it on the launcher: a dead launcher still takes every worker with it. Remote
hosts (ssh agents, srun, joining workers), workers of another interpreter than the
launcher's (``--python-executable``: a wrapper may do something per process), and the
workers of a ``scoop.Executor`` whose output is relayed into a notebook (a
pseudo-terminal each) start as before.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

from .. import _agent, _reaper
from .._template import MAX_MESSAGE, send

# How long the template may take to fork a worker: milliseconds, unless the machine is
# overloaded or the template is stuck (then the job fails to start instead of hanging).
FORK_TIMEOUT_S = 30.0
# How many fork requests the launcher sends before it reads their answers: a few dozen
# short messages, far below what the socket holds, so neither side ever blocks on a send
# while the other does too.
FORK_BATCH = 32


# -- the launcher's side -------------------------------------------------------------------
class Template:
    """The template process of one job, spawned with the workers' interpreter, directory
    and environment; :meth:`fork` starts a worker from it.

    Raises:
        SpawnError: the interpreter could not be started.
    """

    def __init__(self, python: str, cwd: str, pythonpath: str | None, job: str,
                 here: bool = False) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = _agent.worker_env(pythonpath)
        env[_reaper.JOB] = job  # inherited by every worker forked from it
        try:
            if here:  # python is this interpreter (the caller checks it)
                self.proc = _fork_here(theirs, self.sock, cwd, env, pythonpath)
            else:
                self.proc = subprocess.Popen(
                    [python, "-m", _agent.WORKER_MODULE, str(theirs.fileno())],
                    stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True,
                    pass_fds=(theirs.fileno(),))
        except OSError as exc:
            self.sock.close()
            raise _agent.SpawnError(f"cannot start a worker with {python!r}: {exc}. "
                                    "Check --python-executable.") from exc
        finally:
            theirs.close()
        if not here:  # its config, as a worker's: one JSON line (scoop._bootstrap.main)
            self.sock.send(json.dumps({"template": True, "ppid": os.getpid()}).encode()
                           + b"\n")
        self.workers: dict[int, Forked] = {}  # by pid
        self._lock = threading.Lock()  # the launcher's watcher and a library's thread

    def fork(self, cfg: dict, stdin_fd: int | None) -> Forked:
        """Start a worker with config ``cfg`` (``stdin_fd``: its stdin, None: empty)."""
        return self.fork_many([(cfg, stdin_fd)])[0]

    def fork_many(self, requests: list[tuple[dict, int | None]]) -> list[Forked]:
        """Start a worker per ``(cfg, stdin_fd)``, as :meth:`fork`: the requests go out
        :data:`FORK_BATCH` at a time and their answers are read after, so the template
        forks them in a row instead of waiting for the launcher between two forks."""
        out = []
        for first in range(0, len(requests), FORK_BATCH):
            out += self._fork_batch(requests[first:first + FORK_BATCH])
        return out

    def _fork_batch(self, requests: list[tuple[dict, int | None]]) -> list[Forked]:
        configs, writers = [], []
        with self._lock:
            try:
                for cfg, stdin_fd in requests:
                    configs.append(dict(cfg, ppid=self.proc.pid, die_with_parent=True))
                    config_r, config_w = os.pipe()
                    writers.append(config_w)
                    try:
                        fds = [config_r] if stdin_fd is None else [config_r, stdin_fd]
                        send(self.sock, {"wid": cfg["wid"]}, fds)
                    finally:
                        os.close(config_r)
                # Answered in order; an exit report may come between: it names a pid
                # too, never "forked". Each worker is known before the next answer is
                # read, so that an early death of its own is recorded.
                workers = []
                for _ in requests:
                    workers.append(Forked(self, self._read_until("forked")))
                    self.workers[workers[-1].pid] = workers[-1]
            except OSError as exc:
                for config_w in writers:
                    os.close(config_w)
                raise _agent.SpawnError(f"the worker template is gone: {exc}") from None
        for config_w, cfg in zip(writers, configs):
            _agent.write_config(config_w, cfg)
        return workers

    def _read_until(self, key: str) -> int:
        """Read reports until one holds ``key``; return its value."""
        deadline = time.monotonic() + FORK_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            body = self._recv(left)
            if body is None:
                raise OSError("it ended")
            if key in body:
                return body[key]
        raise OSError(f"no answer within {FORK_TIMEOUT_S:.0f} s")

    def _recv(self, timeout: float | None) -> dict | None:
        """The next report ({}: none within ``timeout``; None: the template is gone);
        exit reports are recorded on their workers."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return {}
        data = self.sock.recv(MAX_MESSAGE)
        if not data:
            self._template_gone()
            return None
        body = json.loads(data)
        if "status" in body:
            worker = self.workers.get(body["pid"])
            if worker is not None:
                worker.returncode = body["status"]
        return body

    def collect(self, timeout: float = 0.0) -> None:
        """Take in the exit reports that have come (waiting up to ``timeout`` for one)."""
        with self._lock:
            if self.sock.fileno() < 0:  # no more reports: look at the processes
                self._template_gone()
                time.sleep(timeout)
                return
            while self._recv(timeout):
                timeout = 0.0

    def _template_gone(self) -> None:
        """The template died (its workers got SIGTERM from the kernel): each worker that
        is no longer alive counts as ended by that signal."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        for worker in self.workers.values():
            if worker.returncode is None and not _reaper.alive(worker.pid):
                worker.returncode = -signal.SIGTERM

    def close(self) -> None:
        """End the template (its workers, if any are left, die with it) and reap it."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        try:
            self.proc.wait(_agent.STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Forked:
    """A worker forked by the template, as the launcher uses a ``subprocess.Popen``:
    ``pid``, ``returncode`` (negative: killed by that signal), ``poll()``, ``wait()``."""

    stdin = None

    def __init__(self, template: Template, pid: int) -> None:
        self.template = template
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.template.collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                raise subprocess.TimeoutExpired(f"worker pid {self.pid}", timeout)
            self.template.collect(left)
        return self.returncode

    def __repr__(self) -> str:
        return f"<Forked worker pid={self.pid} returncode={self.returncode}>"


def _fork_here(theirs: socket.socket, ours: socket.socket, cwd: str, env: dict[str, str],
               pythonpath: str | None) -> _Child:
    """Fork the template from this process (``scoop._template.become``), which must have
    no other thread and no ZeroMQ context: what a worker needs is imported first, once."""
    from .. import _bootstrap, _template, _watchdog, futures  # noqa: F401
    from .._runtime import link  # noqa: F401 - ZeroMQ's module, not a context

    if threading.active_count() != 1:
        raise OSError("this process has threads; it cannot fork")
    for stream in (sys.stdout, sys.stderr):  # or the children would write it again
        stream.flush()
    ppid = os.getpid()
    pid = os.fork()
    if pid:
        return _Child(pid)
    try:  # the child never returns into the launcher's code
        ours.close()
        _bootstrap.run_forked(_template.become(theirs.detach(), cwd, env, pythonpath, ppid))
    except BaseException:  # noqa: BLE001 - say why, then leave: the launcher sees EOF
        traceback.print_exc()
    finally:
        os._exit(1)


class _Child:
    """The template forked by :func:`_fork_here`, as the ``Popen`` that :class:`Template`
    uses: ``pid``, ``wait(timeout)``, ``kill()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.poll() is None:
            # It exits as soon as its socket closes: woken by its end (a pidfd, Linux 5.3),
            # not by a polling step (those cost ~5 ms at the end of every job)
            try:
                pidfd = os.pidfd_open(self.pid)
            except (AttributeError, OSError):  # too old: a step of 10 ms
                deadline = None if timeout is None else time.monotonic() + timeout
                while self.poll() is None and (deadline is None
                                               or time.monotonic() < deadline):
                    time.sleep(0.01)
            else:
                try:
                    select.select([pidfd], [], [], timeout)
                finally:
                    os.close(pidfd)
        if self.poll() is None:
            raise subprocess.TimeoutExpired("the worker template", timeout)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
