"""The progress display's parts, on a fake clock and in-memory streams (no job needed)."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from scoop import _progress

from conftest import run_scoop, write_program

pytestmark = pytest.mark.timeout(90)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _line_after(p: _progress.Progress, clock: Clock, seconds: float, done: int):
    """The meter's line once ``done`` items finished ``seconds`` after its first look."""
    meter = _progress.Meter(p)
    meter.line()
    clock.now += seconds
    p.add_done(done)
    return meter, meter.line()


def test_the_line_has_counts_percent_rate_workers_and_time_left():
    clock = Clock()
    p = _progress.Progress(clock)
    p.workers = 4
    p.add_total(10_000)
    _, line = _line_after(p, clock, 10, 2_500)
    assert line.startswith("scoop: 2,500/10,000 items  25%  250/s  4 workers  0:10")
    assert line.endswith("0:30 left")  # 7,500 more at 250/s


def test_an_input_without_length_shows_what_was_read_and_no_time_left():
    clock = Clock()
    p = _progress.Progress(clock)
    p.reading(+1)
    p.add_total(300)
    meter, line = _line_after(p, clock, 2, 100)
    assert "100/300+ items" in line and "%" not in line and "left" not in line
    p.reading(-1)
    assert "33%" in meter.line()


def test_the_rate_follows_the_last_window():
    clock = Clock()
    p = _progress.Progress(clock)
    p.add_total(10**6)
    meter = _progress.Meter(p)
    for _ in range(30):  # 100/s for 30 s ...
        clock.now += 1
        p.add_done(100)
        meter.line()
    for _ in range(30):  # ... then 1,000/s: the window forgets the slow start
        clock.now += 1
        p.add_done(1000)
        line = meter.line()
    assert " 1,000/s" in line


def test_log_lines_come_every_few_seconds_only_when_counts_move_and_at_the_end():
    clock = Clock()
    out = io.StringIO()
    d = _progress.LogLines(out, every=5, clock=clock)
    d.show("scoop: 1/10 items  0:00")
    assert out.getvalue() == ""  # not before the first period
    clock.now += 5
    d.show("scoop: 1/10 items  0:05")
    clock.now += 5
    d.show("scoop: 1/10 items  0:10")  # counts did not move: nothing
    clock.now += 1
    d.show("scoop: 2/10 items  0:11")  # moved, but within the period: nothing
    d.close("scoop: 10/10 items  0:12")
    assert out.getvalue().splitlines() == ["scoop: 1/10 items  0:05",
                                           "scoop: 10/10 items  0:12"]


def test_the_terminal_line_is_redrawn_in_place_and_cleared_for_output():
    out = Tty()
    d = _progress.TerminalLine(out)
    d.show("a")
    d.show("b")
    d.clear()
    d.clear()  # nothing drawn: nothing to clear
    d.close("c")
    assert out.getvalue() == "\r\x1b[Ka\r\x1b[Kb\r\x1b[K\r\x1b[Kc\n"


def test_display_for_picks_the_line_on_a_terminal_and_log_lines_elsewhere():
    p = _progress.Progress()
    assert isinstance(_progress.display_for(Tty(), p), _progress.TerminalLine)
    assert isinstance(_progress.display_for(io.StringIO(), p), _progress.LogLines)


def test_the_programs_prints_clear_the_line_first(monkeypatch):
    """stdout and the line share one terminal: each print starts on a cleared line."""
    term = Tty()
    monkeypatch.setattr(sys, "stdout", term)
    p = _progress.Progress()
    p.add_total(2)
    reporter = _progress.Reporter(p, _progress.TerminalLine(term), tick=0.01).start()
    try:
        for _ in range(500):
            if "scoop: 0/2" in term.getvalue():
                break
            time.sleep(0.01)
        print("hello")
        p.add_done(2)
    finally:
        reporter.stop()
    assert sys.stdout is term  # given back
    text = term.getvalue()
    assert "scoop: 0/2" in text
    before, _, after = text.partition("hello\n")
    assert before.endswith("\r\x1b[K")  # the line was taken away first
    assert after.endswith("\n") and "scoop: 2/2 items  100%" in after.splitlines()[-1]


# -- with a real job ---------------------------------------------------------------------

SUBMITS = """
    import sys, time
    from scoop import futures

    def f(x):
        time.sleep(0.02)
        return x

    if __name__ == "__main__":
        fs = [futures.submit(f, i) for i in range(60)]
        for i, fut in enumerate(fs):
            if i % 20 == 0:
                print("hello", i, flush=True)
            fut.result()
        print("sum", sum(fut.result() for fut in fs))
"""


@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_job_with_progress_ends_with_a_final_line_of_the_counts(tmp_path, how):
    prog = write_program(tmp_path, SUBMITS)
    env = {**os.environ, "SCOOP_PROGRESS": "1"} if how == "environment" else None
    args = ["-n", "2", prog] if how == "environment" else ["-n", "2", "--progress", prog]
    proc = run_scoop(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["hello 0", "hello 20", "hello 40", f"sum {sum(range(60))}"]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("scoop: 60/60 items  100%  "), proc.stderr
    assert "2 workers" in last


@pytest.mark.usefixtures("no_leftovers")
def test_without_progress_nothing_is_shown(tmp_path):
    proc = run_scoop("-n", "2", write_program(tmp_path, SUBMITS))
    assert proc.returncode == 0 and "scoop:" not in proc.stderr, proc.stderr


@pytest.mark.usefixtures("no_leftovers")
def test_on_a_terminal_the_line_is_live_and_the_programs_lines_stay_whole(tmp_path):
    """The launcher on a pseudo-terminal: the live line is redrawn while the job runs,
    and every line the program prints arrives whole, on its own line."""
    prog = write_program(tmp_path, SUBMITS.replace("0.02", "0.05"))
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "scoop", "-n", "2", "--progress", prog],
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.wait(timeout=30) is None:
            proc.kill()
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, text
    assert text.count("\r\x1b[Kscoop: ") >= 3, text  # redrawn while running
    screen = [line.rsplit("\r\x1b[K", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    for expected in ("hello 0", "hello 20", "hello 40", f"sum {sum(range(60))}"):
        assert expected in screen, text  # a whole line, with nothing of the bar on it
    assert [line for line in screen if line.startswith("scoop: ")][-1].startswith(
        "scoop: 60/60 items  100%"), text


MAPS = """
    import sys
    from scoop import futures

    def sq(x):
        return x * x

    def items(n):
        yield from range(n)

    if __name__ == "__main__":
        print(sum(futures.map(sq, range(3000))))
        print(sum(futures.map_as_completed(sq, items(500))))  # no length: counted as read
        print(futures.submit(sq, 3).result())
"""


@pytest.mark.usefixtures("no_leftovers")
def test_maps_count_their_items_not_chunks_with_or_without_a_length(tmp_path):
    proc = run_scoop("-n", "2", "--progress", write_program(tmp_path, MAPS))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(sum(x * x for x in range(3000))),
                                   str(sum(x * x for x in range(500))), "9"]
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("scoop: 3,501/3,501 items  100%  "), proc.stderr
