"""Large frames between the workers of one host: through shared memory, not the sockets.

A job whose workers all run on the launcher's host (``Job.single_host``: no ssh host, no
srun step, no joining worker that may come from anywhere) turns this on in every worker
(its runtime's ``shm``, the job's id: :func:`usable`). A frame of a parcel (the pickle or one of its
out-of-band buffers) of at least :data:`SHM_MIN` bytes is then written once into a file of
``/dev/shm``, and only its name and size travel, through the broker, which forwards them
as any frame. The receiver maps the file: no copy through the broker, none into the
receiving socket, none into a bytearray, no hashing of the data (the parcel's mac covers
the names and sizes). A job spanning hosts sends frames as before: whether it is on one
host is decided once, by the launcher, from the job's description.

Wire form of a parcel with placed frames (any other parcel is unchanged)::

    [manifest] [frame 0 or b""] ... [frame n-1 or b""]
    manifest = MAGIC + JSON [[index, name, size], ...]   (a placed frame is left empty)

A pickle frame starts with the PROTO opcode (0x80), never with :data:`MAGIC`.

The receiver maps each file privately (``MAP_PRIVATE``): copy-on-write, so an array
built on it is writable, as after a plain pickle round trip, and its writes stay its own.

Ownership: who unlinks what, when
    * *Task arguments* (``Shipper._pack_group``) belong to the owner of the tasks. The
      broker keeps a group's frames to send it again if the worker running it dies, so a
      runner only maps them; the owner unlinks them when every task of the group has
      completed at the owner (a :class:`Lease`, released by ``Worker.complete``). A
      re-sent copy that arrives after that (a late duplicate) fails to load, and its
      results are dropped as duplicates.
    * *Results* (``Shipper._pack_results``) are unlinked by the receiver (their owner) as
      soon as it has mapped them. A mapped file stays valid after its unlink (Linux): the
      memory is freed when its last mapping goes, so kept results stay valid.
    * Tasks handed back (RETURN) and shared constants travel as frames: the worker that
      hands tasks back cannot know when they are done; the broker keeps constants for the
      whole job.

Clean-up after a crash: names are ``scoop-<job id>-<pid>-<n>`` (:func:`segment_name`).
    * The launcher removes every ``scoop-<job id>-*`` when the job ends, however it ends
      (``Launcher.stop``): what a SIGKILLed worker or an owner that died left.
    * A worker removes ``scoop-<job id>-<its pid>-*`` on its way out: at the end of the
      job, on the SIGTERM that the launcher's death sends it (PDEATHSIG), or when its
      watchdog finds the broker gone. So a SIGKILLed launcher leaves nothing once its
      workers are gone.
    * The launcher's sweep also removes the files of jobs that are over
      (:func:`sweep_stale`): creator pid dead and no live process marked with the job
      (see :mod:`scoop._reaper`); what a worker SIGKILLed with its launcher left.

Trust: the files have mode 0600 and are checked to be this user's; their contents are not
hashed, so this user's other processes could alter them (as they could debug a worker).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import mmap
import os
import re

from . import _reaper
from ._protocol import buffer_of

DIR = "/dev/shm"
PREFIX = "scoop-"
MAGIC = b"scoop-shm1\n"
# Frames smaller than this travel as frames: creating, writing, mapping and unlinking a
# file costs ~50 us, about what copying 1 MiB four times (socket, broker, socket,
# bytearray) costs (bench/bench_big.py).
SHM_MIN = 1 << 20
_NAME = re.compile(r"scoop-([0-9a-f]{1,64})-(\d+)-(\d+)")

_counter = itertools.count(1)


def available() -> bool:
    """Whether this machine has a shared-memory file system scoop can use (Linux)."""
    return os.path.isdir(DIR) and os.access(DIR, os.W_OK | os.X_OK)


def usable(job: str | None) -> str | None:
    """``job`` if a runtime may place frames in segments named after it (a job on one
    host, /dev/shm here), else None: a runtime's ``shm`` attribute."""
    return job if job and _NAME.fullmatch(f"{PREFIX}{job}-0-0") and available() else None


def segment_name(job: str, pid: int, n: int) -> str:
    return f"{PREFIX}{job}-{pid}-{n}"


def _nbytes(frame) -> int:
    b = buffer_of(frame)
    return len(b) if isinstance(b, bytes) else memoryview(b).nbytes


def _write(frame, job: str) -> str:
    """Write one frame into a new segment of ``job``; return its name."""
    name = segment_name(job, os.getpid(), next(_counter))
    path = os.path.join(DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(buffer_of(frame)).cast("B")
        done, total = 0, view.nbytes
        while done < total:
            done += os.write(fd, view[done:])
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
    return name


def place(frames: list, job: str | None) -> tuple[list, list[str]]:
    """The wire frames of a parcel's ``frames``, with every one of :data:`SHM_MIN` bytes
    or more written to a segment of ``job``; and the names of the segments made (empty
    when ``job`` is None, shared memory being off, or when no frame is large)."""
    if job is None:
        return frames, []
    big = [i for i, f in enumerate(frames) if _nbytes(f) >= SHM_MIN]
    if not big:
        return frames, []
    records: list = []
    out = list(frames)
    try:
        for i in big:
            records.append([i, _write(frames[i], job), _nbytes(frames[i])])
            out[i] = b""
    except OSError:
        # /dev/shm full or gone: this parcel travels as frames
        unlink([name for _, name, _ in records])
        return frames, []
    manifest = MAGIC + json.dumps(records, separators=(",", ":")).encode()
    return [manifest, *out], [name for _, name, _ in records]


def is_placed(frames) -> bool:
    """Whether a parcel's frames carry a manifest (see the module doc)."""
    if not frames:
        return False
    try:
        return bytes(memoryview(buffer_of(frames[0]))[:len(MAGIC)]) == MAGIC
    except TypeError:  # pieces of a split frame (the broker's): never a manifest
        return False


def _map(name: str, size: int) -> mmap.mmap:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a scoop shared-memory segment: {name!r}")
    fd = os.open(os.path.join(DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or st.st_size != size:
            raise ValueError(f"shared-memory segment {name} is not the one sent "
                             f"({st.st_size} bytes, {size} expected)")
        # No MAP_POPULATE: on a private writable mapping it copies every page; pages
        # are mapped as the task reads them (~0.6 us per 4 KiB page).
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def restore(frames, unlink_after: bool = False) -> list:
    """The frames a parcel had before :func:`place`: each placed one as a private mapping
    of its segment (``unlink_after``: then unlinked, as results are). Frames without a
    manifest come back as they are. Raises OSError or ValueError if a segment is gone
    or not what the manifest says."""
    if not is_placed(frames):
        return frames
    try:
        records = json.loads(bytes(buffer_of(frames[0])[len(MAGIC):]))
        out = list(frames[1:])
        names = [name for _, name, _ in records]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"malformed shared-memory manifest: {exc}") from None
    try:
        for i, name, size in records:
            out[i] = _map(name, size)
    finally:
        if unlink_after:
            unlink(names)
    return out


def unlink(names) -> None:
    """Remove segments (those already gone are skipped)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(DIR, name))


class Lease:
    """The segments of one task group's arguments, unlinked when its last task is done."""

    __slots__ = ("names", "left")

    def __init__(self, names: list[str], tasks: int) -> None:
        self.names = names
        self.left = tasks

    def release(self) -> None:
        """One task of the group is done (at its owner)."""
        self.left -= 1
        if self.left == 0:
            unlink(self.names)


# -- sweeps ------------------------------------------------------------------------------

def _segments() -> list[tuple[str, str, int]]:
    """(name, job, creator pid) of the scoop segments in /dev/shm."""
    try:
        names = os.listdir(DIR)
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith(PREFIX) and (m := _NAME.fullmatch(name)):
            found.append((name, m.group(1), int(m.group(2))))
    return found


def sweep_job(job: str | None) -> list[str]:
    """Remove every segment of job ``job``; return their names."""
    if not job:
        return []
    names = [name for name, j, _ in _segments() if j == job]
    unlink(names)
    return names


def sweep_own(job: str | None) -> list[str]:
    """Remove the segments of ``job`` this process made (a worker on its way out)."""
    if not job:
        return []
    me = os.getpid()
    names = [name for name, j, pid in _segments() if j == job and pid == me]
    unlink(names)
    return names


def sweep(job: str | None) -> list[str]:
    """The launcher's sweep at the end of a job: its segments, and those of jobs over
    (:func:`sweep_stale`). Never raises."""
    try:
        return sweep_job(job) + sweep_stale()
    except Exception:  # noqa: BLE001 - cleanup on the way out must not raise
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove this user's segments of jobs that are over: their creator is dead and no
    live process is marked with their job."""
    uid = os.getuid()
    dead: dict[str, list[str]] = {}
    for name, job, pid in _segments():
        if not _alive(pid):
            dead.setdefault(job, []).append(name)
    removed: list[str] = []
    for job, names in dead.items():
        if _reaper.marked(_reaper.JOB, job):
            continue  # the job runs on; its launcher sweeps at its end
        for name in names:
            with contextlib.suppress(OSError):
                if os.stat(os.path.join(DIR, name)).st_uid == uid:
                    os.unlink(os.path.join(DIR, name))
                    removed.append(name)
    return removed
