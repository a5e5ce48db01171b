"""The checkpoint store (scoop._checkpoint): resume a map after a kill, never mix results.

Real files and real processes: programs are written to disk and run with plain python,
edited between runs as a user would; kills are real SIGTERMs and SIGKILLs at seeded
random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

from scoop import _checkpoint
from scoop._checkpoint import (
    Checkpoint,
    CheckpointBusyError,
    CheckpointError,
    Pending,
    Stored,
    checkpointed_map,
    new_run,
    split,
)

pytestmark = pytest.mark.timeout(60)

# What the mapped functions of this file computed. A global, not a closure variable: the
# values a closure captures are part of the function's key, and this list changes.
ran: list = []
failing: set = set()  # items the mapped function of a test raises on


@pytest.fixture(autouse=True)
def _clear_ran():
    ran.clear()
    failing.clear()
    new_run()


def rerun() -> None:
    """What a new run of the program starts with (in-process tests run "again")."""
    ran.clear()
    new_run()


def _python(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=30, env={**os.environ, **(env or {})}, **kw)


# A program of the user's: `ran` shows which items this run computed.
PROGRAM = """\
import json, sys
from scoop._checkpoint import checkpointed_map
ran = []
{defs}
results = list(checkpointed_map(f, {items}, sys.argv[1]))
print(json.dumps({{"ran": ran, "results": results}}))
"""

DOUBLE = "def f(x):\n    ran.append(x)\n    return x * 2"


def _run_program(tmp_path, db, defs: str, items: str = "range(5)", env=None) -> dict:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM.format(defs=textwrap.dedent(defs), items=items))
    proc = _python(str(prog), str(db), env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- round trip and keying -----------------------------------------------------------------

def test_round_trip_resumes_and_returns_stored_values_in_order(tmp_path):
    db = tmp_path / "run.db"

    def f(x):
        ran.append(x)
        return {"x": x, "sq": [x * x], "none": None, "bytes": bytes([x % 256])}

    first = list(checkpointed_map(f, range(20), db))
    assert ran == list(range(20))
    rerun()
    again = list(checkpointed_map(f, range(25), db))
    assert ran == list(range(20, 25))  # only the new items ran
    assert again[:20] == first and again == [f(x) for x in range(25)]
    assert oct(os.stat(db).st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("before, after, items_after, ran_after", [
    # the function's body changes: nothing old is used
    (DOUBLE, "def f(x):\n    ran.append(x)\n    return x * 3", "range(5)", [0, 1, 2, 3, 4]),
    # a constant in a closure changes
    ("def make(k):\n    def f(x):\n        ran.append(x)\n        return x * k\n    return f\n"
     "f = make(2)",
     "def make(k):\n    def f(x):\n        ran.append(x)\n        return x * k\n    return f\n"
     "f = make(3)", "range(5)", [0, 1, 2, 3, 4]),
    # one input item changes: only it runs
    (DOUBLE, DOUBLE, "[0, 1, 99, 3, 4]", [99]),
    # reordered input: every position whose item changed runs again
    (DOUBLE, DOUBLE, "[4, 3, 2, 1, 0]", [4, 3, 1, 0]),
    # an edit elsewhere in the file (lines move) keeps the key: nothing runs
    (DOUBLE, "# a comment\n\n\n" + DOUBLE, "range(5)", []),
    # a default argument changes
    ("def f(x, k=2):\n    ran.append(x)\n    return x * k",
     "def f(x, k=3):\n    ran.append(x)\n    return x * k", "range(5)", [0, 1, 2, 3, 4]),
], ids=["body", "closure-constant", "one-item", "reordered", "moved-lines", "default"])
def test_keys_never_mix_old_results(tmp_path, before, after, items_after, ran_after):
    db = tmp_path / "run.db"
    first = _run_program(tmp_path, db, before)
    assert first["ran"] == [0, 1, 2, 3, 4]
    second = _run_program(tmp_path, db, after, items_after)
    assert second["ran"] == ran_after
    # The right results, whatever was reused: recompute them all in a fresh file.
    fresh = _run_program(tmp_path, tmp_path / "fresh.db", after, items_after)
    assert second["results"] == fresh["results"]


def test_keys_are_stable_across_processes_and_hash_seeds(tmp_path):
    # Items and constants holding sets of strings iterate in another order in each
    # process (hash randomisation); their keys must not.
    defs = """\
    KINDS = 3
    def f(x):
        ran.append(sorted(x))
        return len(x & {"a", "b", "c"}) if "a" in {"a", "z"} else -1
    """
    items = '[{"a", "b"}, frozenset({"c", "d", "e"}), {"x": {"p", "q"}}.get("x")]'
    first = _run_program(tmp_path, tmp_path / "run.db", defs, items,
                         env={"PYTHONHASHSEED": "1"})
    assert len(first["ran"]) == 3
    second = _run_program(tmp_path, tmp_path / "run.db", defs, items,
                          env={"PYTHONHASHSEED": "2"})
    assert second["ran"] == [] and second["results"] == first["results"]


def test_callables_of_every_kind_are_keyed_on_what_they_do():
    import functools

    class Scale:
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return x * self.k

        def apply(self, x):
            return x * self.k

    key = _checkpoint.function_key
    assert key(functools.partial(pow, 2)) != key(functools.partial(pow, 3))
    assert key(Scale(2)) != key(Scale(3)) and key(Scale(2)) == key(Scale(2))
    assert key(Scale(2).apply) != key(Scale(3).apply)
    assert key("{}!".format) != key("{}?".format)
    assert key(abs) != key(len)
    assert key(len, key="v1") != key(len, key="v2")

    def rec(n):
        return 1 if n < 2 else n * rec(n - 1)

    assert key(rec) == key(rec)  # a closure referring to itself


def test_a_function_carrying_something_unpicklable_is_refused_unless_named(tmp_path):
    lock = threading.Lock()

    def f(x):
        with lock:
            return x

    with pytest.raises(CheckpointError, match="cannot key .*f\\(\\).*lock.*key="):
        Checkpoint.open(tmp_path / "run.db", f)
    assert list(checkpointed_map(f, range(3), tmp_path / "run.db", key="f-v1")) == [0, 1, 2]


def test_an_unpicklable_item_is_refused_with_its_index(tmp_path):
    with pytest.raises(CheckpointError, match="input item 1 .*lock.* cannot be pickled"):
        list(checkpointed_map(str, [1, threading.Lock()], tmp_path / "run.db"))


# -- several maps, results, exceptions -------------------------------------------------------

def test_two_maps_in_one_file_and_one_function_mapped_twice(tmp_path):
    db = tmp_path / "run.db"

    def f(x):
        ran.append(("f", x))
        return x + 1

    def g(x):
        ran.append(("g", x))
        return x * 10

    def program():
        # Two maps open at once on one file, then f again after every map closed.
        a = checkpointed_map(f, range(4), db)
        b = checkpointed_map(g, range(4), db)
        out = list(zip(a, b))
        b.close()
        assert not _checkpoint._stores  # the file closed in between
        return out, list(checkpointed_map(f, [10, 20], db))

    first = program()
    assert len(ran) == 10
    rerun()
    assert program() == first == ([(1, 0), (2, 10), (3, 20), (4, 30)], [11, 21])
    assert ran == []


def test_one_function_mapped_twice_on_the_same_input_keeps_each_calls_results(tmp_path):
    # A function that draws a new number at every call (a simulation): each map of the
    # program gets its own draws back, not the other's.
    db = tmp_path / "run.db"

    def draw(x):
        ran.append(x)
        return (x, len(ran))

    def program():
        return (list(checkpointed_map(draw, range(3), db)),
                list(checkpointed_map(draw, range(3), db)))

    first = program()
    assert first[0] != first[1]
    rerun()
    assert program() == first and ran == []


def test_an_unpicklable_result_is_returned_warned_once_and_not_recorded(tmp_path):
    db = tmp_path / "run.db"

    def f(x):
        ran.append(x)
        return threading.Lock() if x % 2 else x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(checkpointed_map(f, range(6), db))
    assert [type(v).__name__ for v in out[1::2]] == ["lock"] * 3 and out[::2] == [0, 2, 4]
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert "f() returned a result that cannot be pickled" in str(caught[0].message)
    rerun()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        list(checkpointed_map(f, range(6), db))
    assert ran == [1, 3, 5]


def test_record_many_records_a_chunk_and_skips_what_cannot_be_pickled(tmp_path):
    db = tmp_path / "run.db"
    with Checkpoint.open(db, None, key="chunks") as ckpt:
        chunk = list(split(ckpt, enumerate("abcd")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            recorded = ckpt.record_many(chunk, ["A", threading.Lock(), "C", lambda: "D"])
        assert recorded == 3 and len(caught) == 1  # the lambda goes by cloudpickle
    rerun()
    with Checkpoint.open(db, None, key="chunks") as ckpt:
        entries = list(split(ckpt, enumerate("abcd")))
    assert [type(e).__name__ for e in entries] == ["Stored", "Pending", "Stored", "Stored"]
    assert entries[0].value == "A" and entries[3].value() == "D"


def test_an_exception_is_not_recorded_and_runs_again(tmp_path):
    db = tmp_path / "run.db"
    failing.add(3)

    def f(x):
        ran.append(x)
        if x in failing:
            raise ValueError(f"bad {x}")
        return x

    got = []
    with pytest.raises(ValueError, match="bad 3"):
        for value in checkpointed_map(f, range(6), db):
            got.append(value)
    assert got == [0, 1, 2]
    failing.clear()
    rerun()
    assert list(checkpointed_map(f, range(6), db)) == list(range(6))
    assert ran == [3, 4, 5]


def test_a_result_that_no_longer_loads_runs_again(tmp_path):
    # A run stores instances of a class from a module of its own; that module is gone
    # when the program runs again.
    db = tmp_path / "run.db"
    (tmp_path / "shapes.py").write_text("class Point:\n    pass\n")
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent("""\
        import sys
        from scoop._checkpoint import checkpointed_map
        import shapes
        def f(x):
            return shapes.Point()
        list(checkpointed_map(f, range(3), sys.argv[1], key="f"))
        """))
    assert _python(str(prog), str(db), cwd=tmp_path).returncode == 0
    assert "shapes" not in sys.modules

    def f(x):
        ran.append(x)
        return x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(checkpointed_map(f, range(3), db, key="f")) == [0, 1, 2]
    assert ran == [0, 1, 2] and len(caught) == 1
    assert "cannot be loaded (ModuleNotFoundError" in str(caught[0].message)


def test_split_is_lazy_and_reads_a_batch_at_a_time(tmp_path):
    db = tmp_path / "run.db"
    list(checkpointed_map(abs, range(1000), db))
    rerun()
    read = []

    def source():
        for i in range(10**9):  # as good as endless: a full scan would never end
            read.append(i)
            yield i, i

    with Checkpoint.open(db, abs) as ckpt:
        entries = split(ckpt, source(), batch=100)
        first = [next(entries) for _ in range(150)]
        assert len(read) == 200
        assert all(isinstance(e, Stored) for e in first)
        for _ in range(1000 - 150):
            next(entries)
        assert next(entries) == Pending(1000, 1000, _checkpoint.item_key(1000))


# -- trust ----------------------------------------------------------------------------------

def test_files_others_could_have_written_are_refused(tmp_path):
    db = tmp_path / "run.db"
    list(checkpointed_map(abs, range(3), db))
    os.chmod(db, 0o666)
    with pytest.raises(CheckpointError, match="writable by group or others.*chmod go-w"):
        Checkpoint.open(db, abs)
    os.chmod(db, 0o600)
    if os.getuid() == 0:  # root can hand the file to someone else
        os.chown(db, 65534, 65534)
        with pytest.raises(CheckpointError, match="owned by uid 65534, not by you"):
            Checkpoint.open(db, abs)
        os.chown(db, 0, 0)
        wal = tmp_path / "run.db-wal"
        wal.write_bytes(b"")
        os.chown(wal, 65534, 65534)
        with pytest.raises(CheckpointError, match="run.db-wal: owned by uid 65534"):
            Checkpoint.open(db, abs)
        wal.unlink()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    if os.getuid() == 0:
        os.chown(shared, 65534, 65534)
        with pytest.raises(CheckpointError, match="writable by others .and not sticky"):
            Checkpoint.open(shared / "run.db", abs)
        os.chmod(shared, 0o1777)  # sticky, like /tmp: fine
        Checkpoint.open(shared / "run.db", abs).close()
    assert list(checkpointed_map(abs, range(3), db)) == [0, 1, 2]


def test_files_that_are_not_checkpoints_are_refused_untouched(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("my notes\n" * 100)
    text.chmod(0o600)
    with pytest.raises(CheckpointError, match="not a scoop checkpoint"):
        Checkpoint.open(text, abs)
    assert text.read_text() == "my notes\n" * 100
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    other.chmod(0o600)
    before = other.read_bytes()
    with pytest.raises(CheckpointError, match="a sqlite database but not a scoop checkpoint"):
        Checkpoint.open(other, abs)
    assert other.read_bytes() == before


def test_another_program_gets_a_busy_error_while_one_holds_the_file(tmp_path, monkeypatch,
                                                                    no_leftovers):
    monkeypatch.setattr(_checkpoint, "BUSY_WAIT_S", 0.5)  # the wait of this process
    db = tmp_path / "run.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""\
            import sys
            from scoop._checkpoint import Checkpoint
            ck = Checkpoint.open({str(db)!r}, abs)
            print("open", flush=True)
            sys.stdin.readline()
            ck.close()
            print("closed", flush=True)
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        start = time.monotonic()
        with pytest.raises(CheckpointBusyError, match="in use by another program"):
            Checkpoint.open(db, abs)
        assert 0.5 <= time.monotonic() - start < 2.5  # it waited, then gave up
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "closed\n"
        # Still running (it has not exited), but it let go: the file opens.
        assert list(checkpointed_map(abs, range(3), db)) == [0, 1, 2]
    finally:
        holder.kill()
        holder.wait()


# -- kills ----------------------------------------------------------------------------------

# Records results in a loop, reporting each flush it completed, until it is killed.
RECORDER = """\
import hashlib, sys
from scoop._checkpoint import Checkpoint, Stored, split
def value(i):
    return hashlib.sha256(str(i).encode()).digest() * (1 + i % 8)
ck = Checkpoint.open(sys.argv[1], None, key="kill-test", batch_size=int(sys.argv[2]),
                     batch_seconds=0.005)
for entry in split(ck, enumerate(range(10**9))):
    if isinstance(entry, Stored):
        continue  # finished by an earlier run
    ck.record(entry.index, entry.key, value(entry.index))
    if entry.index % 97 == 0:
        ck.flush()
        print(entry.index, flush=True)
"""


def _stored_prefix(db) -> int:
    """How many results, from index 0, the file holds; checks each value and the file."""
    value = lambda i: __import__("hashlib").sha256(str(i).encode()).digest() * (1 + i % 8)
    n = 0
    new_run()  # as the recorder's next run would open it (the file may not exist yet)
    with Checkpoint.open(db, None, key="kill-test") as ckpt:
        for entry in split(ckpt, enumerate(range(10**9))):
            if not isinstance(entry, Stored):
                break
            assert entry.value == value(entry.index), f"torn value at {entry.index}"
            n += 1
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count = con.execute("SELECT count(*) FROM results").fetchone()[0]
    finally:
        con.close()
    assert n == count, f"{count} rows but only the first {n} in a row from index 0"
    return n


def test_a_kill_at_any_moment_leaves_a_clean_prefix_of_intact_results(tmp_path, no_leftovers):
    prog = tmp_path / "recorder.py"
    prog.write_text(RECORDER)
    rng = random.Random(13)
    db = tmp_path / "run.db"
    stored = 0
    for attempt in range(6):
        batch = rng.choice([1, 7, 100, 1000])
        child = subprocess.Popen([sys.executable, str(prog), str(db), str(batch)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            # Even attempts: at any moment from the start (imports, creating the file,
            # opening it); odd ones: while it records, so that each run gets further.
            head = "" if attempt % 2 == 0 else child.stdout.readline()
            time.sleep(rng.uniform(0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL  # it was still recording
        flushed = [int(line) for line in (head + out).split()]
        n = _stored_prefix(db)
        # Nothing an earlier run stored, nor anything this one reported as flushed, is
        # lost; the next run starts where the file ends.
        assert n >= stored, (attempt, n, stored)
        if flushed:
            assert n > flushed[-1], (attempt, batch, n, flushed[-1])
        stored = n
    assert stored > 0


# A map whose every computation leaves a line in a log (after the function returned).
KILLED_MAP = """\
import os, signal, sys, time
from scoop._checkpoint import checkpointed_map
db, log, mode = sys.argv[1:4]
log = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
if mode == "term-exits":  # SIGTERM ends the program through its finally blocks
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
def f(x):
    time.sleep(0.002)
    os.write(log, b"%d\\n" % x)
    return x * x
for i, value in enumerate(checkpointed_map(f, range(600), db, batch_seconds=0.2)):
    assert value == i * i, (i, value)
    if i == 100:
        print("going", flush=True)
print("done", flush=True)
"""


@pytest.mark.parametrize("mode", ["term-exits", "term-kills"])
def test_a_killed_map_run_again_computes_each_item_at_most_once_more(tmp_path, mode,
                                                                     no_leftovers):
    prog = tmp_path / "killed_map.py"
    prog.write_text(KILLED_MAP)
    db, log = tmp_path / "run.db", tmp_path / "computed.log"
    args = [sys.executable, str(prog), str(db), str(log), mode]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline() == "going\n"
        time.sleep(random.Random(mode).uniform(0.1, 0.4))
        first.send_signal(signal.SIGTERM)  # as a batch system's wall-time kill: TERM,
        try:                               # then KILL after a grace period
            first.wait(0.5)
        except subprocess.TimeoutExpired:
            first.kill()
    finally:
        first.kill()
        first.wait()
    done_first = log.read_text().split()
    again = _python(*args[1:])
    assert again.returncode == 0 and again.stdout.endswith("done\n"), again.stderr
    counts: dict[int, int] = {}
    for line in log.read_text().split():
        counts[int(line)] = counts.get(int(line), 0) + 1
    assert sorted(counts) == list(range(600))
    twice = [x for x, c in counts.items() if c > 1]
    assert max(counts.values()) <= 2
    assert 100 < len(done_first) < 600  # killed half way
    if mode == "term-exits":
        # The last batch was written on the way out: at most the item between its
        # log line and its record ran again.
        assert len(twice) <= 1, twice
    else:
        # Killed outright: at most the last batch_seconds of results (items take at
        # least 2 ms each; twice that for a flusher thread slowed by a busy machine).
        assert len(twice) <= 2 * 0.2 / 0.002, len(twice)


def test_a_slow_map_loses_at_most_the_last_batch_seconds(tmp_path, no_leftovers):
    db = tmp_path / "run.db"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        import time
        from scoop._checkpoint import Checkpoint, split
        ck = Checkpoint.open({str(db)!r}, None, key="slow", batch_seconds=0.1)
        for entry in split(ck, enumerate(["only"])):
            ck.record(entry.index, entry.key, "done")
        print("recorded", flush=True)
        time.sleep(60)  # a long task: no further result comes to push the batch out
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "recorded\n"
        time.sleep(0.5)
    finally:
        child.kill()
        child.wait()
    with Checkpoint.open(db, None, key="slow") as ckpt:
        assert list(split(ckpt, enumerate(["only"]))) == [Stored(0, "done")]


def test_a_forked_child_never_writes_through_the_parents_connection(tmp_path):
    db = tmp_path / "run.db"
    ckpt = Checkpoint.open(db, None, key="fork", batch_seconds=60)
    for entry in split(ckpt, enumerate(range(3))):
        ckpt.record(entry.index, entry.key, entry.item * 10)
    pid = os.fork()
    if pid == 0:  # a task that forks, records by mistake, then exits through atexit
        try:
            ckpt.record(3, _checkpoint.item_key(3), "from the child")
            _checkpoint._close_all()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    ckpt.close()  # the parent's rows are written once, by the parent
    rerun()
    with Checkpoint.open(db, None, key="fork") as again:
        assert list(split(again, enumerate(range(4)))) == [
            Stored(0, 0), Stored(1, 10), Stored(2, 20), Pending(3, 3, _checkpoint.item_key(3))]
