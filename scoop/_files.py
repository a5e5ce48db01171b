"""Files the launcher reads and writes: never a hang, never more than asked for, and
secrets never readable by others.

Host files, scheduler files and the program are user input: a FIFO would block the
launcher on ``open``, ``/dev/zero`` would fill its memory, so only regular files of a
bounded size are read. The job file holds the key and the log may hold paths and host
names: both are created 0600, the job file atomically (a joining worker may read it at
any moment).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

# The largest hostfile, scheduler file or program read (far above any real one).
MAX_INPUT_BYTES = 64 * 2**20


def read_regular(path: str | os.PathLike[str], limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Raises:
        OSError: it cannot be read, or it is not a regular file (a FIFO, a device, a
            directory) or is larger than ``limit`` (``strerror`` says which).
    """
    # O_NONBLOCK: opening a FIFO without a writer returns at once instead of waiting.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise OSError(0, f"{kind} (a FIFO or device cannot be read as one)", str(path))
        if info.st_size > limit:
            raise OSError(0, f"larger than {limit // 2**20} MiB", str(path))
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew while being read
        raise OSError(0, f"larger than {limit // 2**20} MiB", str(path))
    return data


def create_private(path: str) -> None:
    """Create ``path`` with mode 0600 if it does not exist (an existing file is kept as
    its owner made it), so that a log opened for appending afterwards is private."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def write_atomically(path: str, text: str) -> None:
    """Write ``path`` (mode 0600) so that a reader sees either no file or all of it.

    A joining worker may read the job file while it is written: the text goes to a
    temporary file in the same folder, reaches the disk, and is renamed into place.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".scoop-job-", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
