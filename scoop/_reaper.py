"""Ends the processes that a job's tasks started, however the job ends.

A task may start processes (``subprocess.Popen``, fork and exec, a ``setsid`` double-fork
daemon); none of them may outlive the job. Process groups miss daemons that leave the
group and the session; parent links miss orphans, which the kernel hands to init. So
every process of a job carries a mark in its environment, which its children inherit::

    launcher / host agent     SCOOP_JOB=<job id>             end_marked(JOB, id) at exit
      worker (wid 3)          + SCOOP_WORKER=<job id>.3.<pid>  end_marked(WORKER, tag)
        task's Popen child      inherits both marks            on any exit it controls
          setsid daemon         inherits both marks

*Worker.* On its way out (program done, STOP, SIGTERM, launcher gone) it ends the
processes marked with its own tag, never its siblings', and, if it forked, those of its
session (what a task forked without ``exec``: see :func:`marked`).

*Launcher and host agent.* After their workers are gone they end every process marked
with the job, on their host: what a worker killed outright (SIGKILL, out of memory) left.

A process that empties its own environment escapes the mark: that is the limit of this
scheme, stated in docs/guarantees.md. Linux only (``/proc``); elsewhere nothing is found.
"""

from __future__ import annotations

import os
import signal
import time

JOB = "SCOOP_JOB"  # every process of the job: its id
WORKER = "SCOOP_WORKER"  # a worker and what it started: "<job id>.<wid>.<pid>"
# How long marked processes get to end after SIGTERM before SIGKILL.
TERM_GRACE_S = 1.0


def new_job_id() -> str:
    """A random job id, for :data:`JOB`."""
    return os.urandom(8).hex()


def mark_worker(wid: int) -> str:
    """Give this worker its own mark, inherited by what its tasks start; return it."""
    tag = f"{os.environ.get(JOB, 'nojob')}.{wid}.{os.getpid()}"
    os.environ[WORKER] = tag
    return tag


def marked(variable: str, value: str, exclude: frozenset[int] = frozenset(),
           sessions: frozenset[int] = frozenset()) -> list[int]:
    """Pids of this user's live processes whose environment has ``variable=value``, or
    that are in one of ``sessions``.

    Each process's environment is read once, raw; only those that hold the mark are then
    checked for their owner and state (a scan at each worker's exit, x128 in a wide job:
    ~0.8 ms with 110 processes, 1.5 ms when each was first checked with ``stat``).
    ``sessions``: a local worker makes a session of its own, so what its tasks forked
    without ``exec`` is in it (a worker forked from the launcher shows the launcher's
    environment in ``/proc``, without the mark); it costs a ``stat`` read per process.
    """
    needle = b"\0" + f"{variable}={value}".encode() + b"\0" if value else None
    me, uid = os.getpid(), os.getuid()
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) == me or int(name) in exclude:
            continue
        stat = _stat(name) if sessions else None
        if not (needle and needle in _environ(name)) and not (
                stat and int(stat[3]) in sessions):
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except OSError:
            continue  # gone meanwhile
        if (stat or _stat(name) or [b"Z"])[0] == b"Z":
            continue  # already dead (waiting for its parent), or gone meanwhile
        found.append(int(name))
    return found


def own_session() -> frozenset[int]:
    """This process's session if it leads it (a worker: see :func:`marked`), else none."""
    return frozenset({os.getpid()}) if os.getsid(0) == os.getpid() else frozenset()


def _stat(pid: str) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name: state, ppid, process
    group, session... (empty if gone)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        return os.read(fd, 4096).rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []
    finally:
        os.close(fd)


def _environ(pid: str) -> bytes:
    """The environment of process ``pid`` as ``\\0NAME=VALUE\\0...\\0`` (empty if it is
    not ours to read, or gone)."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    chunks = [b"\0"]
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return b""
    finally:
        os.close(fd)
    chunks.append(b"\0")  # the last entry ends with one already; an extra is harmless
    return b"".join(chunks)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not; one of another user does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of another parent is dead
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def end_marked(variable: str, value: str, exclude: frozenset[int] = frozenset(),
               grace: float = TERM_GRACE_S, sessions: frozenset[int] = frozenset()
               ) -> list[int]:
    """SIGTERM the processes marked ``variable=value`` (or in ``sessions``, see
    :func:`marked`), SIGKILL those left after ``grace`` seconds; return the pids that
    were found. Never raises."""
    if not value and not sessions:
        return []
    try:
        pids = marked(variable, value, exclude, sessions)
        if not pids:
            return []
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            # Look again: a process may have forked while it was being ended.
            left = marked(variable, value, exclude, sessions)
            if not left:
                return pids
            _signal([p for p in left if p not in pids], signal.SIGTERM)
            pids += [p for p in left if p not in pids]
            time.sleep(0.02)
        for _ in range(3):
            left = marked(variable, value, exclude, sessions)
            if not left:
                break
            _signal(left, signal.SIGKILL)
            pids += [p for p in left if p not in pids]
            time.sleep(0.02)
        return pids
    except Exception:  # noqa: BLE001 - cleanup on the way out must not raise
        return []


def end_own(grace: float = TERM_GRACE_S) -> list[int]:
    """A worker on its way out: end what its tasks started, by its mark, and by its
    session if this process forked (what a task forked without ``exec``, which
    ``/proc`` shows without the mark when the worker itself was forked from the
    launcher: see :func:`marked`)."""
    return end_marked(WORKER, os.environ.get(WORKER, ""), grace=grace,
                      sessions=own_session() if _forked else frozenset())


_forked = False  # whether this process forked (os.fork, multiprocessing's fork)


def _note_fork(parent: bool) -> None:
    global _forked
    _forked = parent  # a forked child (a worker from its template) forked nothing yet


os.register_at_fork(after_in_parent=lambda: _note_fork(True),
                    after_in_child=lambda: _note_fork(False))


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
