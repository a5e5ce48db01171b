"""Resume after a kill: the store behind ``futures.map(f, items, checkpoint="run.db")``.

New in scoop (the original SCOOP has no checkpoints; issue 13). The ``checkpoint=``
argument of ``futures.map`` and ``map_as_completed`` opens one here and hands it to its
``scoop._mapping.Feed``, which calls :meth:`Checkpoint.lookup`, :meth:`~Checkpoint.to_run`,
:meth:`~Checkpoint.record_chunk` and :meth:`~Checkpoint.merge` per chunk.

The flow this module owns::

    input ──enumerate──> split() ──per batch: one range look-up──┐
                            │                                     │
                            ├─ Stored(index, value) ─────────────────────> yielded as is
                            └─ Pending(index, item, key) ─> submitted ─> result
                                                                     │
                  record() / record_many() <───────────────┘ (and yielded)
                            │  rows wait in memory: a batch goes to the file in one
                            │  transaction every BATCH_SIZE rows or BATCH_SECONDS
                            v
                          run.db (sqlite, WAL) ── close(): the last batch

*The map* (root process, the program's own call) opens one :class:`Checkpoint` per call,
passes its enumerated input through :func:`split`, submits only the ``Pending`` items,
and hands each result to :meth:`Checkpoint.record` as it arrives. It closes the
checkpoint when it ends, however it ends (``finally``).

*The store* (one per file and process, shared by every map of the program on that file)
holds the sqlite connection, the rows not written yet, and a flusher thread that writes
them at most ``BATCH_SECONDS`` after they arrived, so that a slow map loses little.

Integration sketch: the streaming map (:func:`checkpointed_map` is the same flow one
item at a time, in-process, and is what the tests drive). ``checkpoint`` is the map's
argument; items of several iterables are their zipped tuples, as the chunks carry them::

    ckpt = Checkpoint.open(checkpoint, func)      # at the call: refuses others' files,
    try:                                          # keys func, counts the call
        for entry in split(ckpt, enumerate(items), batch=buffersize):
            if isinstance(entry, Stored):         # finished in an earlier run:
                ready(entry.index, entry.value)   # yielded at its place, never sent
            else:
                chunk.append(entry)               # a Pending: send entry.item, and
                ...                               # keep (index, key) with the chunk
        # as the results of a chunk arrive (the ones before a failure too, never the
        # exception itself); never raises for a value:
        ckpt.record_many(chunk, results)          # or record(index, key, value)
    finally:
        ckpt.close()                              # writes the last batch

``map_as_completed`` yields each ``Stored`` value as ``split`` produces it. ``record`` may
be called in any order of indices, from any thread; ``close`` more than once.

Keys: what makes a stored result the right one
----------------------------------------------
A row is ``(call, index, item key, pickled value)``; a stored value is used only when
all of ``call``, ``index`` and the item key match.

* **The function key** is a SHA-256 over its module and qualified name and its
  *behaviour as code*: the bytecode and constants of its code object (and of the code
  objects nested in it), its names, argument layout and flags, its default arguments,
  and the values in its closure cells (functions there are keyed the same way,
  recursively), as they are when the map is called. Line numbers and file names are
  left out, so editing elsewhere in the
  file does not invalidate a checkpoint; a changed body, a changed constant or a changed
  closure value does. ``functools.partial`` objects are keyed on their function and
  arguments, bound methods on their function and their object (pickled), other callable
  objects on their class's ``__call__`` and their pickled state, builtins and classes on
  their name. The key is stable across runs and processes of the same Python version
  (a frozenset constant is keyed on its sorted elements, so hash randomisation does not
  matter); another Python version has other bytecode, so it recomputes everything.
  A closure over state that changes (a counter, a cache, a list it appends to) gets a
  new key whenever that state differs at the call: its items are recomputed (safe, but
  nothing resumes); name its version with ``key=`` instead.
  Limits: what the function reads *at call time* is not in its key: global variables,
  the top-level functions it calls, files, library versions. Change any of those and
  the old results would be taken as valid: pass ``key="my-f-v2"`` to name the
  function's version yourself (it replaces the automatic key), or delete the file.
* **The call key** is the function key plus the call's ordinal: the n-th map of that
  function on that file in this program run (0, 1, ...). Two maps of one function in one
  program therefore never share rows, and a re-run that makes the same calls in the same
  order finds each one's rows again. If a re-run skips a call, the next one takes its
  ordinal; the item keys below then differ and its items are recomputed, never mixed.
  The ordinal (rather than the input's fingerprint, which a streaming map does not
  know before it has read all its input) also keeps apart two maps of one function on
  the same input: a function that draws random numbers gets fresh draws in each.
  :func:`new_run` counts from 0 again in a long-lived process; in IPython (a notebook)
  each cell run does, so a cell run again resumes its maps.
* **The item key** is an encoding of the item, or its SHA-256 (128 bits kept) when the
  encoding is 16 bytes or longer: ``repr()`` for None, bools, ints, floats, complex
  numbers, strings, bytes and tuples, lists and dicts (in their order) of those; a
  canonical encoding where sets come in (their elements sorted by encoding, so
  deterministic across processes); the pickle (cloudpickle, as the item would travel)
  for anything else. Exact types only: a subclass goes by its pickle. It is
  stored with the item's index and checked at look-up, so a changed item, or reordered
  input, recomputes each position whose item differs (an item inserted near the start
  shifts those after it: they all run again; items appended at the end do not). An
  input whose pickle is not deterministic across runs (an object holding a set of
  strings) gets a new key every run: it is recomputed each time, which costs time but
  never returns a wrong result.
  An item that cannot be pickled is refused with :class:`CheckpointError` (it could not
  be sent to a worker either).

Commit policy, and what a kill loses
------------------------------------
sqlite in WAL mode with ``synchronous=NORMAL``: a transaction is complete in the log
when ``COMMIT`` returns, and a killed process (``kill -9``, at any instruction) leaves
the file with every committed transaction and none of a half-written one: there are no
torn rows. Only a power loss or OS crash can drop the last committed transactions, never
corrupt the file (``synchronous=FULL``, one fsync per commit, would cover that too; the
benchmark ``bench/bench_checkpoint.py`` measures both). Rows go to the file in batches,
one transaction each, every ``BATCH_SIZE`` rows or ``BATCH_SECONDS`` after the first row
of a batch, whichever comes first, and at :meth:`Checkpoint.close`. A kill therefore
loses at most the results of the last ``BATCH_SECONDS`` (and fewer than ``BATCH_SIZE``):
those items run again at the next run, as do the items running at the kill. A program
that ends through its ``finally`` blocks (Ctrl-C, a SIGTERM handler raising SystemExit)
loses none: :meth:`Checkpoint.close` writes the last batch, and an ``atexit`` hook those
of maps left unfinished. Together
with the map's own loss (items a worker finished but had not reported), a map killed
and run again computes each item at most once more than it had finished.

Results, exceptions
-------------------
* A result is pickled when it is recorded: plain pickle (classes by reference, so a
  re-run loads them as the program defines them then), or cloudpickle for what plain
  pickle refuses (lambdas, nested functions and classes). One that cannot be pickled
  is still returned by the map in this run; it is only not recorded (one warning per
  call naming the function), so the next run computes it again.
* A result that can no longer be unpickled at look-up (its class was removed or renamed)
  counts as missing: the item runs again (one warning per call).
* An exception raised by the function is never recorded: the map only records results.
  A re-run returns the stored results before it and calls the function on that item
  again. A function that *returns* an exception object has it recorded like any value.

Trust, and one writer
---------------------
A checkpoint holds pickles, and unpickling runs code: an existing file is opened only
if it is a regular file owned by the user, not writable by group or others, and so are
its ``-wal`` and ``-journal`` companions, in a folder that is the user's own, or that
others cannot write to, or that is sticky (like /tmp: others cannot replace the file);
otherwise :class:`CheckpointError` says which test failed.
A new file is created with mode 0600. A file that is not a scoop checkpoint (another
sqlite database, any other file) is refused, never modified.

The store opens the file with ``locking_mode=EXCLUSIVE``: the process that opened it
holds the lock until it closes it, and no shared-memory index is used (which sqlite's
WAL mode otherwise needs, and which does not work on a network file system; its file
locks must still work there). Another program opening
the same file meanwhile waits up to ``BUSY_WAIT_S`` (a previous run still exiting) and
then gets :class:`CheckpointBusyError`. Within one program, every map on that file goes
through the one store: only that process writes. Open checkpoints from the program (the
root worker); a map inside a task that opened the same file on another worker would get
the busy error.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import io
import os
import pickle
import sqlite3
import stat
import struct
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from . import _files, _serialize

__all__ = ["Checkpoint", "CheckpointError", "CheckpointBusyError", "Stored", "Pending",
           "split", "checkpointed_map", "function_key", "item_key", "new_run"]

# Rows written per transaction at most: a commit costs a few tens of microseconds (WAL,
# synchronous=NORMAL), so batching makes it negligible per row; a kill loses fewer rows
# than this (they are recomputed).
BATCH_SIZE = 1000
# The longest a recorded row waits in memory before it is written: the most work a kill
# can lose from a slow map. Shorter costs one commit per interval, nothing more.
BATCH_SECONDS = 0.5
# Items looked up per query in split(): one range scan per batch instead of one query per
# item, and no more input read ahead of the map than this.
LOOKUP_BATCH = 256
# How long opening a file held by another program waits before CheckpointBusyError: long
# enough for a previous run that is still exiting, short enough to tell the user soon.
BUSY_WAIT_S = 2.0

# NORMAL: a commit is safe from a killed process (what checkpoints are for), and only a
# power loss or OS crash can lose the last commits. FULL adds an fsync per commit and
# guards against those too. Measured (bench/bench_checkpoint.py, 2-core VM, ext4): with
# batching both cost 5-7 us per recorded item, within noise of each other; a commit per
# row costs 20 us with NORMAL, 190-400 us with FULL. NORMAL stays the default because
# an fsync on a network file system can take tens of milliseconds, paid up to every
# BATCH_SIZE results of a fast map, to cover a case (a node's power) that a kill is not.
SYNCHRONOUS = "NORMAL"

# "SCKP": marks a sqlite file as a scoop checkpoint (PRAGMA application_id).
APPLICATION_ID = 0x53434B50
SCHEMA_VERSION = 1
# Bytes of SHA-256 kept in keys: 128 bits cannot collide by chance.
KEY_BYTES = 16
# A result's row id is (call id << INDEX_BITS) + index: a map of up to 2**40 items, and
# 2**23 calls per file.
INDEX_BITS = 40


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used (not the user's own, not a checkpoint, an input
    that cannot be keyed)."""


class CheckpointBusyError(CheckpointError):
    """Another program holds the checkpoint file."""


class Stored(NamedTuple):
    """An item finished in an earlier run: its stored result."""

    index: int
    value: Any


class Pending(NamedTuple):
    """An item still to run; record its result with ``index`` and ``key``."""

    index: int
    item: Any
    key: bytes


# -- keys ---------------------------------------------------------------------------------

_ATOM_TAGS = {type(None): b"N", bool: b"B", int: b"I", float: b"F", complex: b"C",
              str: b"S", bytes: b"Y", type(...): b"."}
_CANON_DEPTH = 32


def _pickled(obj: Any) -> bytes:
    """The pickle of ``obj`` as it would travel (cloudpickle), buffers in band."""
    out = io.BytesIO()
    _serialize._Pickler(out, protocol=5).dump(obj)
    return out.getvalue()


def _stored_pickle(value: Any) -> bytes:
    """A result as stored: plain pickle where it works (ten times faster for small
    values; classes go by reference, so a re-run loads them as the program now defines
    them), else cloudpickle (lambdas, closures, classes of ``__main__`` by value)."""
    try:
        return pickle.dumps(value, protocol=5)
    except Exception:  # noqa: BLE001 - cloudpickle may manage; if not, it raises
        return _pickled(value)


def _checked(index: int) -> int:
    if not 0 <= index < 2**INDEX_BITS:
        raise ValueError(f"checkpoint: item index {index} out of range")
    return index


def _canon(obj: Any, out: list[bytes], depth: int = _CANON_DEPTH) -> None:
    """Append a deterministic encoding of ``obj``; raises ValueError where none exists
    (then the caller falls back to the pickle)."""
    kind = type(obj)  # exact types: a subclass may pickle (and behave) differently
    tag = _ATOM_TAGS.get(kind)
    if tag is not None:
        if kind is str:
            raw = obj.encode("utf-8", "surrogatepass")
        elif kind is bytes:
            raw = obj
        elif kind is float:
            raw = obj.hex().encode()  # exact, and -0.0 differs from 0.0
        elif kind is complex:
            raw = f"{obj.real.hex()},{obj.imag.hex()}".encode()
        else:
            raw = repr(obj).encode()
        out += (tag, struct.pack("<Q", len(raw)), raw)
        return
    if depth == 0:
        raise ValueError("too deep (or a cycle)")
    if kind in (tuple, list):
        out += (b"T" if kind is tuple else b"L", struct.pack("<Q", len(obj)))
        for x in obj:
            _canon(x, out, depth - 1)
    elif kind is dict:
        out += (b"D", struct.pack("<Q", len(obj)))
        for k, v in obj.items():
            _canon(k, out, depth - 1)
            _canon(v, out, depth - 1)
    elif kind in (set, frozenset):
        # Iteration order follows string hashes, which change with every process.
        parts = []
        for x in obj:
            sub: list[bytes] = []
            _canon(x, sub, depth - 1)
            parts.append(b"".join(sub))
        out += (b"E" if kind is set else b"Z", struct.pack("<Q", len(obj)), *sorted(parts))
    else:
        raise ValueError(f"no canonical form for {kind.__qualname__}")


def _value_bytes(obj: Any) -> bytes:
    """Canonical bytes of a builtin value, else its pickle (may raise)."""
    out: list[bytes] = []
    try:
        _canon(obj, out)
        return b"c" + b"".join(out)
    except ValueError:
        return b"p" + _pickled(obj)


# Exact types whose repr() is deterministic and tells every value apart (also inside
# tuples, lists and dicts, which keep their order).
_REPR_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})


def _reprable(obj: Any, depth: int = 4) -> bool:
    kind = type(obj)
    if kind in _REPR_ATOMS:
        return True
    if depth == 0:
        return False
    if kind is tuple or kind is list:
        for x in obj:
            if type(x) not in _REPR_ATOMS and not _reprable(x, depth - 1):
                return False
        return True
    if kind is dict:
        return _reprable(tuple(obj.items()), depth)
    return False


def item_key(item: Any, index: int | None = None) -> bytes:
    """The key of one input item (see the module docstring); at most 16 bytes.

    Raises:
        CheckpointError: the item cannot be pickled.
    """
    # The hot path of a map of small items: repr() runs in C, and a short encoding is its
    # own key (a hash costs as much again). Each form has its own first byte; kept
    # encodings are at most 15 bytes, hashes exactly 16: no two forms can meet.
    raw = None
    if _reprable(item):
        with contextlib.suppress(ValueError):  # an int too long for str()
            raw = b"r" + repr(item).encode("utf-8", "surrogatepass")
    if raw is None:
        try:
            raw = _value_bytes(item)
        except Exception as exc:  # noqa: BLE001 - any pickling failure is reported
            where = "" if index is None else f" {index}"
            raise CheckpointError(
                f"checkpoint: input item{where} ({type(item).__module__}."
                f"{type(item).__qualname__}) cannot be pickled to key it: {exc}") from exc
    if len(raw) < KEY_BYTES:
        return raw
    return hashlib.sha256(raw).digest()[:KEY_BYTES]


def _code_into(h: Any, code: types.CodeType) -> None:
    # Line numbers, positions and the file name are left out on purpose: editing other
    # parts of the file must not invalidate a checkpoint.
    h.update(b"code")
    for part in (code.co_code, getattr(code, "co_exceptiontable", b"")):
        h.update(struct.pack("<Q", len(part)))
        h.update(part)
    h.update(repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                   code.co_flags, code.co_names, code.co_varnames, code.co_freevars,
                   code.co_cellvars)).encode())
    h.update(struct.pack("<Q", len(code.co_consts)))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_into(h, const)
        else:
            out: list[bytes] = []
            try:
                _canon(const, out)  # atoms, tuples and frozensets of them
            except ValueError:  # a kind of constant a later Python may bring
                out = [f"{type(const).__qualname__}:{const!r}".encode()]
            h.update(b"".join(out))


def _callable_into(h: Any, func: Any, seen: set[int], what: str) -> None:
    """Feed ``func``'s identity and behaviour into the hash ``h``."""
    if id(func) in seen:  # a recursive closure refers to itself
        h.update(b"again")
        return
    seen.add(id(func))
    if isinstance(func, functools.partial):
        h.update(b"partial")
        _callable_into(h, func.func, seen, what)
        _state_into(h, (func.args, func.keywords), seen, what)
    elif isinstance(func, types.MethodType):
        h.update(b"method")
        _callable_into(h, func.__func__, seen, what)
        _state_into(h, func.__self__, seen, what)
    elif isinstance(func, types.FunctionType):
        h.update(f"function {func.__module__}.{func.__qualname__}\0".encode())
        _code_into(h, func.__code__)
        _state_into(h, (func.__defaults__, func.__kwdefaults__), seen, what)
        cells = []
        for cell in func.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                cells.append(None)
        h.update(struct.pack("<Q", len(cells)))
        for value in cells:
            _state_into(h, value, seen, what)
    elif isinstance(func, (type, types.BuiltinFunctionType)) or (
            not hasattr(func, "__dict__") and hasattr(func, "__qualname__")):
        # Classes, builtins, method descriptors: what they do is their name's, and the
        # object a builtin method is bound to ("{}!".format).
        name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        h.update(f"named {getattr(func, '__module__', '')}.{name}\0".encode())
        bound = getattr(func, "__self__", None)
        if bound is not None and not isinstance(bound, types.ModuleType):
            _state_into(h, bound, seen, what, whole=True)
    else:
        cls = type(func)
        h.update(f"object {cls.__module__}.{cls.__qualname__}\0".encode())
        call = vars(cls).get("__call__")  # the class's own method, not a descriptor's
        if isinstance(call, types.FunctionType):
            _callable_into(h, call, seen, what)
        _state_into(h, func, seen, what, whole=True)


def _state_into(h: Any, value: Any, seen: set[int], what: str, whole: bool = False) -> None:
    """Feed a value a function carries (default, closure cell, bound object)."""
    if not whole and (callable(value) and not isinstance(value, type)
                      and not isinstance(value, (tuple, list, dict))):
        _callable_into(h, value, seen, what)
        return
    if not whole and isinstance(value, tuple):
        h.update(struct.pack("<Q", len(value)))
        for x in value:
            _state_into(h, x, seen, what)
        return
    try:
        raw = _value_bytes(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure is reported
        raise CheckpointError(
            f"checkpoint: cannot key {what}: it carries a "
            f"{type(value).__module__}.{type(value).__qualname__} that cannot be pickled "
            f"({exc}); pass key='name-and-version' to name the function yourself") from exc
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def _describe(func: Any) -> str:
    inner = func
    while isinstance(inner, functools.partial):
        inner = inner.func
    name = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    return f"{getattr(inner, '__module__', None) or '?'}.{name}"


def function_key(func: Callable, key: str | None = None) -> bytes:
    """The key of a mapped function (see the module docstring); 16 bytes.

    Args:
        func: the mapped callable.
        key: the function's identity given by the user; replaces the automatic key.

    Raises:
        CheckpointError: something the function carries (a closure value, a default, its
            bound object) cannot be pickled; pass ``key`` instead.
    """
    h = hashlib.sha256()
    if key is not None:
        h.update(b"user\0" + key.encode())
    else:
        _callable_into(h, func, set(), _describe(func) + "()")
    return h.digest()[:KEY_BYTES]


# -- the store ------------------------------------------------------------------------------

def _check_trusted(path: str) -> None:
    """Refuse a checkpoint whose pickles someone else could have written."""
    uid = os.getuid()
    folder = os.path.dirname(os.path.abspath(path))
    info = os.stat(folder)
    if (info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            and not info.st_mode & stat.S_ISVTX and info.st_uid != uid):
        raise CheckpointError(
            f"checkpoint {path}: its folder {folder} is writable by others (and not "
            f"sticky): anyone could replace the file, whose pickles run code when loaded")
    for name in (path, path + "-wal", path + "-journal"):
        try:
            info = os.stat(name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"checkpoint {name}: not a regular file")
        if info.st_uid != uid:
            raise CheckpointError(
                f"checkpoint {name}: owned by uid {info.st_uid}, not by you (uid {uid}); "
                f"its pickles would run code when loaded, so only your own file is read")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise CheckpointError(
                f"checkpoint {name}: writable by group or others (mode "
                f"{stat.S_IMODE(info.st_mode):04o}); its pickles would run code when "
                f"loaded: chmod go-w it if you trust its content")


class _Store:
    """One open checkpoint file in this process, shared by every map on it."""

    def __init__(self, path: str, batch_size: int, batch_seconds: float) -> None:
        self.path = path
        self.batch_size = batch_size
        self.batch_seconds = batch_seconds
        self.users = 0
        self.rows: list[tuple] = []
        self.due: float | None = None  # when the first unwritten row must be written
        self.closed = False
        self.pid = os.getpid()  # a forked child must not touch the parent's connection
        self.error: BaseException | None = None
        # A plain Lock under the condition: record() takes it once per result, and
        # entering a Lock is a C call (the Condition's own __enter__ is Python code).
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        fresh = not os.path.exists(path)
        if fresh:
            _files.create_private(path)
        _check_trusted(path)
        # check_same_thread=False: the flusher thread writes too, always under self.cond.
        self.db = sqlite3.connect(path, timeout=BUSY_WAIT_S, isolation_level=None,
                                  check_same_thread=False)
        try:
            self._setup(path)
        except BaseException:
            self.db.close()
            raise
        self.flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                        name=f"scoop-checkpoint {os.path.basename(path)}")
        self.flusher.start()

    def _setup(self, path: str) -> None:
        db = self.db
        try:
            # Before the first access: the lock is then held until close, and WAL keeps
            # its index in this process's memory instead of a shared -shm file.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            app = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and app != APPLICATION_ID:
                raise CheckpointError(f"checkpoint {path}: a sqlite database but not a "
                                      f"scoop checkpoint; refusing to touch it")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if tables and version != SCHEMA_VERSION:
                raise CheckpointError(f"checkpoint {path}: made by another scoop version "
                                      f"(schema {version}, this one reads {SCHEMA_VERSION})")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise CheckpointError(f"checkpoint {path}: cannot use WAL mode there")
            db.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            db.execute("BEGIN IMMEDIATE")  # takes the write lock now, held until close
            db.execute(f"PRAGMA application_id={APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("CREATE TABLE IF NOT EXISTS calls (id INTEGER PRIMARY KEY, "
                       "call BLOB UNIQUE, func TEXT, ordinal INTEGER, created REAL)")
            # One B-tree keyed by (call id, index) packed in the rowid: no second index
            # to update per row, and large values sit in the table as they would anyway.
            db.execute("CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY, "
                       "item BLOB, value BLOB)")
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise CheckpointBusyError(
                    f"checkpoint {path}: in use by another program (waited "
                    f"{BUSY_WAIT_S:g} s); one program at a time may use a checkpoint "
                    f"file") from exc
            raise CheckpointError(f"checkpoint {path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise CheckpointError(f"checkpoint {path}: not a scoop checkpoint ({exc})") \
                from exc

    # Everything below runs under self.cond.

    def begin_call(self, fkey: bytes, ordinal: int, name: str) -> tuple[int, bool]:
        """The first row id of a call's results, and whether an earlier run made it."""
        call = hashlib.sha256(fkey + struct.pack("<Q", ordinal)).digest()[:KEY_BYTES]
        row = self.db.execute("SELECT id FROM calls WHERE call=?", (call,)).fetchone()
        if row is None:
            cur = self.db.execute("INSERT INTO calls (call, func, ordinal, created) "
                                  "VALUES (?,?,?,?)", (call, name, ordinal, time.time()))
            call_id = cur.lastrowid
        else:
            call_id = row[0]
        if call_id >= 2**(63 - INDEX_BITS):
            raise CheckpointError(f"checkpoint {self.path}: too many calls in one file; "
                                  f"start a new one")
        return call_id << INDEX_BITS, row is not None

    def write(self) -> None:
        rows, self.rows, self.due = self.rows, [], None
        if not rows or self.closed or self.pid != os.getpid():
            return
        try:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?)", rows)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            # Disk full, file removed: the map goes on; the results are just not kept.
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            if self.error is None:
                self.error = exc
                warnings.warn(f"checkpoint {self.path}: cannot record results ({exc}); "
                              f"the map goes on without recording them", RuntimeWarning,
                              stacklevel=2)

    def _flush_loop(self) -> None:
        # Writes a batch BATCH_SECONDS after its first row at the latest, even when no
        # further result arrives (a map of slow tasks).
        with self.cond:
            while not self.closed:
                if self.due is None:
                    self.cond.wait()
                    continue
                left = self.due - time.monotonic()
                if left > 0:
                    self.cond.wait(left)
                else:
                    self.write()

    def close(self) -> None:
        if self.closed:
            return
        self.write()
        self.closed = True
        self.cond.notify_all()
        if self.pid == os.getpid():  # sqlite: a connection never crosses a fork
            self.db.close()


_stores: dict[str, _Store] = {}
# (file, function key) -> maps of it so far in this program, whether or not the file
# stayed open in between.
_ordinals: dict[tuple[str, bytes], int] = {}
_stores_lock = threading.Lock()


def new_run() -> None:
    """Count maps from 0 again, as a new run of the program does (the call key's
    ordinal): for a session that runs the same code again in one process (a notebook
    cell, a test)."""
    with _stores_lock:
        _ordinals.clear()


_cells_counted = False


def _count_cells_as_runs() -> None:
    """In IPython (a notebook, a console), each cell run counts as a run of the program:
    a cell run again (after an interrupt, an error, a fix) resumes its maps."""
    global _cells_counted
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or _cells_counted:
        return
    _cells_counted = True
    shell.events.register("pre_run_cell", lambda *info: new_run())


@atexit.register
def _close_all() -> None:
    """Write the last batches of maps the program left unfinished."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        with store.cond:
            if not store.closed:
                store.close()


class Checkpoint:
    """The store of one map call: look up finished items, record new results.

    Make one with :meth:`open`; the map calls :meth:`lookup` (through :func:`split`),
    :meth:`record` and :meth:`close`.
    """

    def __init__(self, store: _Store, base: int, name: str, known: bool) -> None:
        self._store = store
        self._base = base  # row id of index 0
        self.name = name
        self.known = known  # an earlier run made this call: look-ups can find rows
        self._warned_value = self._warned_load = False
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike[str], func: Callable, *, key: str | None = None,
             batch_size: int = BATCH_SIZE, batch_seconds: float = BATCH_SECONDS
             ) -> Checkpoint:
        """Open (or create) the checkpoint file ``path`` for one map of ``func``.

        Args:
            path: the sqlite file; created (mode 0600) if missing.
            func: the mapped function; its key is computed here (:func:`function_key`).
            key: names the function's version yourself instead (bump it when what the
                function reads at call time changes).
            batch_size: rows written per transaction at most (the file's first opener
                in this program sets it).
            batch_seconds: the longest a row waits before it is written (likewise).

        Raises:
            CheckpointError: the file is not the user's own, is writable by others, is
                not a checkpoint, or ``func`` cannot be keyed.
            CheckpointBusyError: another program holds the file.
        """
        name = _describe(func)
        fkey = function_key(func, key)
        real = os.path.realpath(os.fspath(path))
        _count_cells_as_runs()
        with _stores_lock:
            store = _stores.get(real)
            if store is None:
                store = _stores[real] = _Store(real, batch_size, batch_seconds)
            store.users += 1
            ordinal = _ordinals.get((real, fkey), 0)
            _ordinals[real, fkey] = ordinal + 1
        try:
            with store.cond:
                base, known = store.begin_call(fkey, ordinal, name)
        except BaseException as exc:
            cls(store, 0, name, False).close()  # let go of the file
            if isinstance(exc, sqlite3.Error):
                raise CheckpointError(f"checkpoint {real}: {exc}") from exc
            raise
        return cls(store, base, name, known)

    def lookup(self, indexed_items: list[tuple[int, Any]]) -> list[Stored | Pending]:
        """Stored results and pending items, in the order given (one query).

        Raises:
            CheckpointError: an item cannot be pickled to key it.
        """
        if not self.known:  # a call no earlier run made: nothing to look up
            return [Pending(_checked(i), item, item_key(item, i))
                    for i, item in indexed_items]
        keyed = [(_checked(i), item, item_key(item, i)) for i, item in indexed_items]
        found: dict[int, tuple[bytes, bytes]] = {}
        if keyed:
            indices = [i for i, _, _ in keyed]
            base = self._base
            with self._store.cond:
                rows = self._store.db.execute(
                    "SELECT id, item, value FROM results WHERE id BETWEEN ? AND ?",
                    (base + min(indices), base + max(indices))).fetchall()
            found = {i - base: (k, v) for i, k, v in rows}
        out: list[Stored | Pending] = []
        for i, item, k in keyed:
            row = found.get(i)
            if row is not None and row[0] == k:
                try:
                    out.append(Stored(i, pickle.loads(row[1])))
                    continue
                except Exception as exc:  # noqa: BLE001 - recompute instead
                    if not self._warned_load:
                        self._warned_load = True
                        warnings.warn(f"checkpoint: a stored result of {self.name}() cannot "
                                      f"be loaded ({type(exc).__name__}: {exc}); such items "
                                      f"run again", RuntimeWarning, stacklevel=2)
            out.append(Pending(i, item, k))
        return out

    def record(self, index: int, key: bytes, value: Any) -> bool:
        """Record the result of the item at ``index`` (``key`` from its :class:`Pending`).

        Never raises for the value: one that cannot be pickled is not recorded (one
        warning per call). Returns whether it was recorded.
        """
        return self.record_many(((index, key),), (value,)) == 1

    def record_many(self, entries: Iterable[Pending | tuple[int, bytes]],
                    values: Iterable[Any]) -> int:
        """Record the results of a chunk: ``values[i]`` is the result of ``entries[i]``
        (a :class:`Pending`, or an ``(index, key)`` pair); as :meth:`record`, with one
        lock for the lot. Returns how many were recorded."""
        rows = []
        base = self._base
        for entry, value in zip(entries, values):
            index, key = entry[0], entry[-1]
            if not 0 <= index < 2**INDEX_BITS:
                raise ValueError(f"checkpoint: item index {index} out of range")
            try:
                rows.append((base + index, key, _stored_pickle(value)))
            except Exception as exc:  # noqa: BLE001 - the map still returns it
                if not self._warned_value:
                    self._warned_value = True
                    warnings.warn(
                        f"checkpoint: {self.name}() returned a result that cannot be "
                        f"pickled (item {index}, {type(value).__qualname__}: {exc}); it is "
                        f"returned but not recorded, so a re-run computes it again",
                        RuntimeWarning, stacklevel=3)
        store = self._store
        with store.lock:
            if self._closed:
                raise ValueError("record() on a closed checkpoint")
            store.rows += rows
            if len(store.rows) >= store.batch_size:
                store.write()
            elif store.due is None and store.rows:
                store.due = time.monotonic() + store.batch_seconds
                store.cond.notify()
        return len(rows)

    @staticmethod
    def to_run(layout: list[Stored | Pending]) -> list:
        """The items of a looked-up chunk that are still to run, in order."""
        return [e.item for e in layout if type(e) is Pending]

    def record_chunk(self, layout: list[Stored | Pending], results: list) -> None:
        """Record the ``results`` of :meth:`to_run`'s items (fewer if one failed); none
        once closed (a chunk sent before its map stopped early finishes later)."""
        pending = [e for e in layout if type(e) is Pending]
        try:
            self.record_many(pending[:len(results)], results)
        except ValueError:
            if not self._closed:  # (closed meanwhile, by the map's thread)
                raise

    @staticmethod
    def merge(layout: list[Stored | Pending], results: list) -> list:
        """A chunk's results in input order: the stored ones in their places, the new
        ``results`` (of :meth:`to_run`'s items; fewer if one failed) in theirs, up to
        the first item without a result."""
        merged, new = [], iter(results)
        for e in layout:
            if type(e) is Stored:
                merged.append(e.value)
                continue
            try:
                merged.append(next(new))
            except StopIteration:  # the item that failed: its error follows
                break
        return merged

    def flush(self) -> None:
        """Write the rows recorded so far now (the map needs not call it)."""
        with self._store.cond:
            self._store.write()

    def close(self) -> None:
        """Write what is left; the file closes with the last map using it."""
        if self._closed:
            return
        self._closed = True
        store = self._store
        with _stores_lock, store.cond:
            store.users -= 1
            if store.users == 0:
                store.close()
                if _stores.get(store.path) is store:
                    del _stores[store.path]
            else:
                store.write()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def split(checkpoint: Checkpoint, indexed_items: Iterable[tuple[int, Any]],
          batch: int = LOOKUP_BATCH) -> Iterator[Stored | Pending]:
    """The map's input, each item either done (:class:`Stored`) or to run (:class:`Pending`),
    in input order.

    Lazy: it reads at most ``batch`` items ahead of what it has yielded, and asks the
    file once per batch (a range look-up on the indices), never for the whole table.
    """
    it = iter(indexed_items)
    while True:
        chunk = []
        for pair in it:
            chunk.append(pair)
            if len(chunk) >= batch:
                break
        if not chunk:
            return
        yield from checkpoint.lookup(chunk)


def checkpointed_map(func: Callable, iterable: Iterable, path: str | os.PathLike[str],
                     **options: Any) -> Iterator:
    """``map(func, iterable)`` one item at a time, in this process, resuming from ``path``.

    The reference of the flow the parallel map follows (and what the tests drive): the
    checkpoint opens at the call, as the map's will (the call's ordinal follows the
    program's calls, not the order their results are consumed); stored results come
    back in order, only the rest runs, and each new result is recorded as it is
    computed. An exception stops the map and is not recorded. ``options`` go to
    :meth:`Checkpoint.open`.
    """
    ckpt = Checkpoint.open(path, func, **options)

    def results() -> Iterator:
        with ckpt:
            for entry in split(ckpt, enumerate(iterable)):
                if isinstance(entry, Stored):
                    yield entry.value
                else:
                    value = func(entry.item)
                    ckpt.record(entry.index, entry.key, value)
                    yield value

    return results()
