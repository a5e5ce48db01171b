"""A map survives workers dying one after another (issue 8): the items a chunk finished do
not run again, only the item running at a death is charged, and a poison item still fails
after --max-attempts. The accounting itself: scoop._chunks, tested as a table."""

from __future__ import annotations

import json

import pytest

from scoop import _chunks

from conftest import run_scoop, write_program

# The program's own helpers: the non-root workers (the root's siblings under the launcher)
# and a log of each item's runs, one file per item: "start|end pid time" lines.
HELPERS = """
import json, os, signal, threading, time
from scoop import futures

def workers():
    me, parent = os.getpid(), os.getppid()
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent:
                pids.append(int(name))
    return sorted(pids)

def record(log, i, what):
    with open(os.path.join(log, str(i)), "a") as f:
        f.write(f"{what} {os.getpid()} {time.time()}\\n")
"""


def _runs(log_dir, n):
    """Per item: the list of (pid, started, ended or None) of its runs."""
    runs = {}
    for i in range(n):
        path = log_dir / str(i)
        entries, open_runs = [], {}
        for line in path.read_text().splitlines() if path.exists() else []:
            what, pid, t = line.split()
            if what == "start":
                open_runs[int(pid)] = len(entries)
                entries.append([int(pid), float(t), None])
            else:
                entries[open_runs.pop(int(pid))][2] = float(t)
        runs[i] = entries
    return runs


@pytest.mark.timeout(150)
@pytest.mark.usefixtures("no_leftovers")
def test_map_survives_workers_killed_one_after_another(tmp_path):
    """1,500 items of 20 ms on -n 4; three workers SIGKILLed 1.5 s apart, from a thread of
    the root. The map gives the serial result, and no item that had finished ran again
    (an item may run twice only if it was running when its worker was killed, or finished
    right then: its report had not left yet)."""
    log = tmp_path / "log"
    log.mkdir()
    kills = tmp_path / "kills.json"
    prog = write_program(tmp_path, HELPERS + f"""
LOG, N = {str(log)!r}, 1500

def item(i):
    record(LOG, i, "start")
    time.sleep(0.02)
    record(LOG, i, "end")
    return i * i

def killer(victims, out):
    for pid in victims:
        time.sleep(1.5)
        out.append((pid, time.time()))
        os.kill(pid, signal.SIGKILL)

if __name__ == "__main__":
    victims, done = workers(), []
    assert len(victims) == 3, victims
    t = threading.Thread(target=killer, args=(victims, done), daemon=True)
    t.start()
    results = list(futures.map(item, range(N)))
    t.join()
    with open({str(kills)!r}, "w") as f:
        json.dump(done, f)
    print(results == [i * i for i in range(N)])
""")
    out = run_scoop("-n", "4", prog, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True", out.stdout + out.stderr
    assert "WorkerLostError" not in out.stderr
    assert out.stderr.count("was killed by SIGKILL") == 3, out.stderr
    killed = {pid: t for pid, t in json.loads(kills.read_text())}
    twice = []
    for i, entries in _runs(log, 1500).items():
        assert entries, f"item {i} never ran"
        assert all(end is not None for _, _, end in entries[-1:]), f"item {i}: {entries}"
        for pid, _, end in entries[:-1]:
            # an earlier run: on a killed worker, unfinished or finished just before
            assert pid in killed, f"item {i} ran again after a run on a live worker"
            assert end is None or killed[pid] - end < _chunks.FLUSH_S * 3, (
                f"item {i} had finished {killed[pid] - end:.3f} s before its worker was "
                f"killed, and ran again: {entries}")
            twice.append(i)
    # at most a few items per death: the one running and those not yet reported
    print(f"items run twice: {len(twice)} {twice}")
    assert len(twice) <= 3 * 4, twice


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_leftovers")
def test_map_item_that_kills_its_worker_fails_after_max_attempts(tmp_path):
    """An item that SIGKILLs its worker each time it runs fails the map with
    WorkerLostError after --max-attempts deaths, naming the item (or the one before
    it, whose report may have died with the worker); the results before it come first.
    Item 10 is in the map's first chunk, which the root keeps, then hands back when it
    waits with a timeout: it is resumed like any other."""
    prog = write_program(tmp_path, HELPERS + """
import scoop

def item(i):
    time.sleep(0.02)
    if i == 10 and scoop.worker != 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return i * i

if __name__ == "__main__":
    got = []
    try:
        for value in futures.map(item, range(300), timeout=100):  # the root runs nothing
            got.append(value)
    except futures.WorkerLostError as exc:
        print(len(got), got == [i * i for i in range(len(got))], exc)
""")
    out = run_scoop("-n", "4", prog, timeout=110)
    assert out.returncode == 0, out.stderr
    count, same, message = out.stdout.strip().split(" ", 2)
    assert same == "True" and count in ("9", "10"), out.stdout
    assert message.startswith(f"item() on item {count}: 3 workers died running this task")
    assert out.stderr.count("was killed by SIGKILL") == 3, out.stderr


# -- the accounting, as a table ------------------------------------------------------------
@pytest.mark.parametrize("reported, batch, fine, running, expect_pieces, charged", [
    # nothing reported yet, not running (a queued chunk): no charge, pieces of the rest
    (0, 0, False, False, [(100, 125), (125, 150), (150, 175), (175, 200)], None),
    # running, nothing reported: the whole rest is charged
    (0, 0, False, True, [(100, 125), (125, 150), (150, 175), (175, 200)], (100, 200)),
    # running, reports of up to 3 items, 40 reported: items 140-146 charged, a fine piece
    (40, 3, False, True, [(140, 147, True), (147, 161), (161, 175), (175, 189), (189, 200)],
     (140, 147)),
    # a fine piece: the item after the last reported one, or the next
    (5, 1, True, True, [(105, 107, True), (107, 131), (131, 155), (155, 179), (179, 200)],
     (105, 107)),
    # everything reported (the final result died with the worker): nothing to run
    (100, 10, False, True, [], None),
])
def test_plan_charges_only_what_may_have_been_running(reported, batch, fine, running,
                                                      expect_pieces, charged):
    ch = _chunks.Chunk(100, fine=fine)
    ch.parts = list(range(reported))
    ch.batch = batch
    pieces, failed = _chunks.plan(ch, 100, running, max_attempts=3, size=2)
    assert failed is None
    assert [(a, b, True) if f else (a, b) for a, b, f in pieces] == expect_pieces
    assert ch.lineage.charges == ([charged] if charged else [])


def test_lineage_fails_the_first_item_charged_max_attempts_times():
    lineage = _chunks.Lineage()
    assert lineage.charge(10, 20, 3) is None      # coarse: 10-19 once
    assert lineage.charge(14, 16, 3) is None      # a fine piece: 14, 15 twice
    assert lineage.charge(15, 17, 3) == 15        # 15 three times
    assert [lineage.count(x) for x in (9, 10, 14, 15, 16, 17, 20)] == [0, 1, 2, 3, 2, 1, 0]
    other = _chunks.Lineage()                     # deaths far apart charge nobody twice
    for start in (0, 50, 90):
        assert other.charge(start, start + 7, 3) is None
    assert max(other.count(x) for x in range(100)) == 1


def test_plan_of_a_chunk_whose_item_failed_keeps_the_items_before_it():
    ch = _chunks.Chunk(0, fine=True)
    ch.parts = list(range(7))
    ch.lineage.charges = [(7, 9), (7, 9)]
    pieces, failed = _chunks.plan(ch, 20, True, max_attempts=3, size=1)
    assert failed == 7 and pieces == []
    ch.lineage.charges = [(8, 10), (8, 10)]
    pieces, failed = _chunks.plan(ch, 20, True, max_attempts=3, size=1)
    assert failed == 8 and pieces == [(7, 8, False)]


class _Runtime:
    """What a Stream needs of a worker: where it reports to."""

    def __init__(self) -> None:
        self.reports: list[list] = []
        self.polls = 0

    def send_partial(self, owner, tid, values, func=None) -> None:
        assert (owner, tid) == (1, 7)
        self.reports.append(values)

    def poll_messages(self) -> None:
        self.polls += 1


def _slow(x):
    import time

    time.sleep(0.01)
    if x == "boom":
        raise ValueError(x)
    return x * 2


@pytest.mark.parametrize("fine", [False, True])
def test_stream_reports_finished_results_and_returns_the_rest(fine):
    rt = _Runtime()
    out: list = []
    n = 12 if fine else 30
    _chunks.Stream(rt, 1, 7, fine).run(_slow, list(range(n)), False, out)
    reported = [v for r in rt.reports for v in r]
    assert reported + out == [x * 2 for x in range(n)]
    if fine:  # a report after every item but the last
        assert [len(r) for r in rt.reports] == [1] * (n - 1) and out == [n * 2 - 2]
    else:  # 300 ms of 10 ms items: reports at least every FLUSH_S (how many: timing)
        assert rt.reports


def test_stream_of_tiny_items_reports_nothing_and_a_failure_keeps_the_rest():
    rt = _Runtime()
    out: list = []
    _chunks.Stream(rt, 1, 7, False).run(abs, list(range(-50_000, 0)), False, out)
    assert rt.reports == [] and out == list(range(50_000, 0, -1))
    out = []
    with pytest.raises(ValueError):
        _chunks.Stream(rt, 1, 7, True).run(_slow, [1, 2, "boom", 4], False, out)
    assert [v for r in rt.reports for v in r] + out == [2, 4]


def test_stream_of_a_local_chunk_takes_in_messages_instead_of_reporting():
    rt = _Runtime()
    out: list = []
    _chunks.Stream(rt, None, 0, False).run(_slow, list(range(20)), False, out)
    assert out == [x * 2 for x in range(20)] and rt.reports == [] and rt.polls >= 1
