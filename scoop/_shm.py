"""Large frames between the workers of one host: through shared memory, not the sockets.

A job whose workers all run on the launcher's host (``Job.shm``: no ssh host, no srun
step, no joining worker that may come from anywhere) turns this on in every runtime
(its ``shm`` attribute, the job's id: :func:`usable`). A frame of a parcel (the pickle
or one of its out-of-band buffers) of at least :data:`SHM_MIN` bytes is then written into
a file of ``/dev/shm``, and only its name and size travel, through the broker, which
forwards them as any frame: no copy through the sockets and the broker, no hashing of
the data (the parcel's mac covers the names and sizes). A job spanning hosts sends
frames as before: whether it is on one host is decided once, by the launcher, from the
job's description, so no message needs to know where its receiver is.

Wire form of a parcel with placed frames (any other parcel is unchanged)::

    [manifest] [frame 0 or b""] ... [frame n-1 or b""]       (a placed frame is empty)
    manifest = MAGIC + JSON [[index, name, size], ...]        results: one-shot segments
                        or  [[index, name, size, gen], ...]   task arguments: pooled ones

A pickle frame starts with the PROTO opcode (0x80), never with :data:`MAGIC`.

Ownership: who frees what, when
    * *Results* (``Shipper._pack_results``) go in a segment of their own, which their
      receiver (the owner of the futures) maps privately (``MAP_PRIVATE``: no copy;
      copy-on-write, so an array built on it is writable, as after a plain pickle round
      trip) and unlinks at once. A mapped file stays valid after its unlink (Linux): its
      memory is freed with its last mapping, so results that are kept stay valid.
    * *Task arguments* (``Shipper._pack_group``) belong to the owner of the tasks. The
      broker keeps a group's frames to send it again if the worker running it dies, so
      a runner never frees them; the owner frees them when every task of the group has
      completed there (a :class:`Lease`, released by ``Worker.complete``). Freed, they go
      back to the owner's :class:`Pool` and carry another group's arguments later: a
      fresh segment costs its pages' allocation (~5 ms per 10 MB here), a reused one a
      copy (~1.5 ms). So a runner copies arguments out (~1-5 ms per 10 MB) instead of
      mapping them, and checks the segment's generation before and after: a late
      duplicate of a group already done fails to load (its results are dropped as
      duplicates anyway) instead of reading another group's data.
    * Tasks handed back (RETURN) and shared constants travel as frames: the worker that
      hands tasks back cannot know when they are done; the broker keeps constants for the
      whole job.

Clean-up: names are ``scoop-<job id>-<pid>-<n>`` (:func:`segment_name`).
    * A runtime that closes removes its pool, leased segments too (``Worker.close``).
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
import struct

from . import _reaper
from ._protocol import buffer_of

DIR = "/dev/shm"
PREFIX = "scoop-"
MAGIC = b"scoop-shm1\n"
_MAGIC_LEN = len(MAGIC)
# Frames smaller than this travel as frames. Measured here (2 workers, many tasks of one
# size, MB/s frames -> shared memory): arguments 64 KiB 455 -> 645, 128 KiB 401 -> 780,
# 1 MiB 595 -> 2,623; results 64 KiB 816 -> 1,156, 128 KiB 712 -> 1,828. The crossover
# is below 64 KiB (OOB_MIN, under which buffers stay inside the pickle anyway); 128 KiB
# keeps a margin for a machine where a file costs more.
SHM_MIN = 128 * 1024
_NAME = re.compile(r"scoop-([0-9a-f]{1,64})-(\d+)-(\d+)")

# Idle argument segments a runtime keeps for reuse (see Pool), at most; and at most this
# share of /dev/shm (a container's is often 64 MB).
POOL_IDLE_MAX = 1 << 30
POOL_IDLE_SHARE = 1 / 8
_HEADER = struct.Struct("<Q")  # a pooled segment: its generation, then the data
_counter = itertools.count(1)  # segment names
_generations = itertools.count(1)  # what a pooled segment holds now


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


def _create(job: str) -> tuple[str, int]:
    """A new, empty segment of ``job``: its name and open descriptor."""
    name = segment_name(job, os.getpid(), next(_counter))
    fd = os.open(os.path.join(DIR, name),
                 os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, 0o600)
    return name, fd


def _view(frame) -> memoryview:
    return memoryview(buffer_of(frame)).cast("B")


def write_once(frame, job: str) -> list:
    """Write one frame into a new segment (a result's: its receiver unlinks it once
    mapped); its manifest record ``[name, size]``."""
    name, fd = _create(job)
    try:
        view = _view(frame)
        done, total = 0, view.nbytes
        while done < total:
            done += os.write(fd, view[done:])
    except BaseException:
        unlink([name])
        raise
    finally:
        os.close(fd)
    return [name, total]


def small(frames: list) -> bool:
    """Whether no frame is large enough to be placed (:func:`place` would leave them as
    they are): the common case, told apart without a call per frame (issue 12)."""
    for f in frames:
        if (len(f) if type(f) is bytes else memoryview(f).nbytes) >= SHM_MIN:
            return False
    return True


def place(frames: list, write) -> list:
    """The wire frames of a parcel's ``frames``: every one of :data:`SHM_MIN` bytes or
    more written by ``write(frame)`` (which returns its manifest record), behind a
    manifest; ``frames`` themselves when none is that large."""
    big = [i for i, f in enumerate(frames) if _nbytes(f) >= SHM_MIN]
    if not big:
        return frames
    out = list(frames)
    records = []
    for i in big:
        records.append([i, *write(frames[i])])
        out[i] = b""
    manifest = MAGIC + json.dumps(records, separators=(",", ":")).encode()
    return [manifest, *out]


def place_results(frames: list, job: str | None) -> list:
    """:func:`place` for a batch of results, in segments of their own (see the module
    doc); the frames as they are when ``job`` is None or /dev/shm is full."""
    if job is None:
        return frames
    made: list[str] = []

    def write(frame) -> list:
        record = write_once(frame, job)
        made.append(record[0])
        return record

    try:
        return place(frames, write)
    except OSError:  # /dev/shm full or gone: this parcel travels as frames
        unlink(made)
        return frames


def is_placed(frames) -> bool:
    """Whether a parcel's frames carry a manifest (see the module doc)."""
    if not frames:
        return False
    first = frames[0]
    if type(first) is bytes:
        return first[:_MAGIC_LEN] == MAGIC
    try:  # a zmq.Frame is a buffer: its .buffer costs a memoryview more
        return bytes(memoryview(first)[:_MAGIC_LEN]) == MAGIC
    except TypeError:  # pieces of a split frame (the broker's): never a manifest
        return False


def _open(name: str, size: int) -> int:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a scoop shared-memory segment: {name!r}")
    fd = os.open(os.path.join(DIR, name), os.O_RDONLY | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_size < size:
        os.close(fd)
        raise ValueError(f"shared-memory segment {name} is not the one sent "
                         f"({st.st_size} bytes, {size} expected)")
    return fd


def _map(name: str, size: int) -> mmap.mmap:
    """A private, writable mapping of a result's segment (no copy)."""
    fd = _open(name, size)
    try:
        # No MAP_POPULATE: on a private writable mapping it copies every page; pages
        # are mapped as the task reads them (~0.6 us per 4 KiB page).
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _generation(fd: int) -> int:
    return _HEADER.unpack(os.pread(fd, _HEADER.size, 0))[0]


def _copy(name: str, size: int, gen: int) -> bytearray:
    """A copy of the data of a pooled segment, if it still holds generation ``gen``."""
    fd = _open(name, size + _HEADER.size)
    try:
        buf = bytearray(size)
        view = memoryview(buf)
        if _generation(fd) == gen:
            done = 0
            while done < size:
                n = os.preadv(fd, [view[done:]], _HEADER.size + done)
                if n <= 0:
                    break
                done += n
            if done == size and _generation(fd) == gen:
                return buf
        raise ValueError(f"shared-memory segment {name} was reused: this is a late copy "
                         "of a task group already done")
    finally:
        os.close(fd)


def restore(frames, unlink_after: bool = False) -> list:
    """The frames a parcel had before :func:`place`: a result's segment as a private
    mapping (``unlink_after``: then unlinked), a pooled argument's as a copy. Frames
    without a manifest come back as they are. Raises OSError or ValueError if a segment
    is gone or not what the manifest says."""
    if not is_placed(frames):
        return frames
    try:
        records = json.loads(bytes(buffer_of(frames[0])[len(MAGIC):]))
        out = list(frames[1:])
        once = [r[1] for r in records if len(r) == 3]
    except (ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"malformed shared-memory manifest: {exc}") from None
    try:
        for i, name, size, *gen in records:
            out[i] = _copy(name, size, gen[0]) if gen else _map(name, size)
    finally:
        if unlink_after:
            unlink(once)
    return out


def unlink(names) -> None:
    """Remove segments (those already gone are skipped)."""
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(DIR, name))


class _Segment:
    """A pooled segment: a generation, then the data of its latest frame."""

    __slots__ = ("name", "capacity")

    def __init__(self, job: str, capacity: int) -> None:
        self.capacity = capacity
        self.name, fd = _create(job)
        os.close(fd)

    def write(self, frame) -> list:
        # pwrite, not a mapping: no page to fault in (a fresh shared mapping costs ~11 ms
        # per 10 MB here, more than its data's allocation) and a full /dev/shm is an
        # OSError here, not a SIGBUS later.
        view = _view(frame)
        gen = next(_generations)
        fd = os.open(os.path.join(DIR, self.name), os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.pwrite(fd, _HEADER.pack(0), 0)  # a reader copying meanwhile sees it changed
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], _HEADER.size + done)
            os.pwrite(fd, _HEADER.pack(gen), 0)
        finally:
            os.close(fd)
        return [self.name, view.nbytes, gen]

    def drop(self) -> None:
        unlink([self.name])


class Pool:
    """The argument segments of one runtime: reused from group to group, because making
    a fresh one costs ~5 ms per 10 MB here (the kernel allocates its pages) and
    overwriting one ~1.5 ms. At most :data:`POOL_IDLE_MAX` bytes (and
    :data:`POOL_IDLE_SHARE` of /dev/shm) stay idle."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.free: list[_Segment] = []
        self.idle = 0
        self.made: set[_Segment] = set()  # every live segment, leased or free
        self.closed = False
        try:
            st = os.statvfs(DIR)
            self.idle_max = min(POOL_IDLE_MAX, int(st.f_blocks * st.f_frsize * POOL_IDLE_SHARE))
        except OSError:
            self.idle_max = 0

    def _take(self, size: int) -> _Segment:
        fits = [s for s in self.free if size <= s.capacity <= 2 * size]
        if fits:
            seg = min(fits, key=lambda s: s.capacity)
            self.free.remove(seg)
            self.idle -= seg.capacity
            return seg
        seg = _Segment(self.job, -(-size // SHM_MIN) * SHM_MIN)
        self.made.add(seg)
        return seg

    def place(self, frames: list, tasks: int) -> tuple[list, Lease | None]:
        """:func:`place` for a task group of ``tasks`` tasks; and the lease that gives
        its segments back when they are all done (None if none was used)."""
        used: list[_Segment] = []

        def write(frame) -> list:
            used.append(self._take(_nbytes(frame)))
            return used[-1].write(frame)

        try:
            out = place(frames, write)
        except OSError:  # /dev/shm full or gone: this group travels as frames
            self.give_back(used)
            return frames, None
        return out, (Lease(self, used, tasks) if used else None)

    def give_back(self, segments: list[_Segment]) -> None:
        """Segments no reader needs any more: kept for reuse, the largest dropped while
        more than ``idle_max`` bytes would stay idle."""
        if self.closed:
            return
        self.free.extend(segments)
        self.idle += sum(s.capacity for s in segments)
        while self.idle > self.idle_max:
            seg = max(self.free, key=lambda s: s.capacity)
            self.free.remove(seg)
            self.idle -= seg.capacity
            self.made.discard(seg)
            seg.drop()

    def close(self) -> None:
        """Remove every segment, leased ones too (the runtime is closing: a future kept
        after the job must not keep the pool's memory alive)."""
        self.closed = True
        for seg in self.made:
            seg.drop()
        self.made, self.free, self.idle = set(), [], 0


class Lease:
    """The segments of one task group's arguments, back to their pool when its last
    task is done (at its owner: ``Worker.complete``)."""

    __slots__ = ("pool", "segments", "left")

    def __init__(self, pool: Pool, segments: list[_Segment], tasks: int) -> None:
        self.pool = pool
        self.segments = segments
        self.left = tasks

    def release(self) -> None:
        """One task of the group is done."""
        self.left -= 1
        if self.left == 0:
            self.pool.give_back(self.segments)


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


def sweep_stale() -> list[str]:
    """Remove this user's segments of jobs that are over: their creator is dead and no
    live process is marked with their job."""
    uid = os.getuid()
    dead: dict[str, list[str]] = {}
    for name, job, pid in _segments():
        if not _reaper.alive(pid):
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
