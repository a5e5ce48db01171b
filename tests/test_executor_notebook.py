"""scoop.Executor in a real Jupyter kernel: a notebook executed by nbclient.

Cells define functions, lambdas and classes that run on the workers; a map is
interrupted as the kernel's interrupt button does (SIGINT to the kernel); a task's
error shows its worker-side traceback; what tasks print shows in the notebook; the
kernel's shutdown and restarts (graceful and forced) leave no process behind.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import marked_processes, running, wait_no_processes

nbformat = pytest.importorskip("nbformat", reason="needs nbformat: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="needs nbclient: pip install -e '.[test]'")
pytest.importorskip("ipykernel", reason="needs ipykernel: pip install -e '.[test]'")
from jupyter_client import KernelManager  # noqa: E402 - comes with nbclient

pytestmark = [pytest.mark.timeout(110), pytest.mark.usefixtures("no_leftovers")]

CHECKPOINTED_CELL = """def counted(x):
    with open("computed", "a") as f:
        f.write(f"{x}\\n")
    return 2 * x

got = list(pool.map(counted, range(30), checkpoint="cells.db"))"""
CELLS = [
    # 0: the pool
    """import os, time
import scoop
from scoop import futures
pool = scoop.Executor(2)""",
    # 1: definitions that exist only in the kernel
    """def square(x):
    return x * x

cube = lambda x: x ** 3

class Point:
    def __init__(self, x):
        self.x = x
    def norm2(self):
        return self.x * self.x

def make_point(x):
    return Point(x)

def where(_):
    time.sleep(0.05)
    return os.getpid()""",
    # 2: they run on the workers
    """print(list(pool.map(square, range(5))), list(pool.map(cube, range(3))),
      [p.norm2() for p in pool.map(make_point, range(4))],
      isinstance(pool.submit(make_point, 2).result(), Point),
      os.getpid() not in set(pool.map(where, range(8), chunksize=1)))""",
    # 3: interrupted (the test's timeout_func interrupts it after 3 s)
    """def slow(x):
    time.sleep(0.2)
    return x

started = time.monotonic()
total = sum(pool.map(slow, range(400), chunksize=1))""",
    # 4: the pool goes on, the rest of the interrupted map was cancelled
    """t0 = time.monotonic()
print("after", pool.submit(square, 3).result(timeout=20), time.monotonic() - t0 < 5)""",
    # 5: an error's worker-side traceback, with the cell's own lines (map and submit)
    """def explode(x):
    return {}["missing key " + str(x)]

try:
    list(pool.map(explode, range(3)))
except KeyError as exc:
    print("map shows the line:", 'return {}["missing key " + str(x)]' in str(exc.__cause__))
pool.submit(explode, 7).result()""",
    # 6: the module-level API inside `with`, as DEAP's toolbox.register("map", futures.map)
    """with scoop.Executor(2) as inner:
    print("with", list(futures.map(square, range(4))), futures.submit(cube, 2).result(),
          futures.submit(os.getpid).result() != os.getpid())""",
    # 7: what tasks print shows in the cell that runs when it arrives
    """pool.submit(print, "printed by a worker").result()
time.sleep(0.5)""",
    # 8, 9: a checkpointed map, and its cell run again: it resumes, nothing recomputed
    *[CHECKPOINTED_CELL] * 2,
    # 10
    """print(len(open("computed").read().split()), got == [2 * x for x in range(30)])""",
]
INTERRUPTED, FAILING = 3, 5


def _outputs(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")


def test_notebook_cells_run_on_the_pool(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in CELLS]
    for i in (INTERRUPTED, FAILING):
        nb.cells[i].metadata["tags"] = ["raises-exception"]
    client = nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", interrupt_on_timeout=True,
        timeout_func=lambda cell: 3 if "total = sum" in cell.source else 60,
        resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # then shuts the kernel down (gracefully): the pool goes with it
    cells = nb.cells
    assert _outputs(cells[2]).split() == ["[0,", "1,", "4,", "9,", "16]", "[0,", "1,", "8]",
                                         "[0,", "1,", "4,", "9]", "True", "True"]
    error = [o for o in cells[INTERRUPTED].outputs if o.output_type == "error"]
    assert error and error[0].ename == "KeyboardInterrupt"
    assert _outputs(cells[4]).split() == ["after", "9", "True"]
    error = [o for o in cells[FAILING].outputs if o.output_type == "error"][0]
    assert error.ename == "KeyError"
    assert _outputs(cells[FAILING]) == "map shows the line: True\n"
    traceback = "\n".join(error.traceback)
    assert "Traceback from worker" in traceback
    assert 'return {}["missing key " + str(x)]' in traceback  # the cell's own line
    assert _outputs(cells[6]).split() == ["with", "[0,", "1,", "4,", "9]", "8", "True"]
    assert _outputs(cells[7]) == "printed by a worker\n"
    assert _outputs(cells[10]) == "30 True\n"  # each item computed once
    assert not wait_no_processes(timeout=15)


def _run(kc, code: str) -> str:
    """Execute ``code`` in the kernel; its stdout (fails on an error)."""
    out = []
    reply = kc.execute_interactive(code, timeout=60, output_hook=lambda msg: out.append(
        msg["content"].get("text", "")) if msg["msg_type"] == "stream" else None)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(out)


START_POOL = """import os, scoop
pool = scoop.Executor(2)
print(sorted(set(pool.map(lambda _: os.getpid(), range(20), chunksize=1))))"""


@pytest.mark.parametrize("forced", [False, True], ids=["graceful", "forced"])
def test_kernel_restart_leaves_no_process(forced):
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    try:
        kc = km.blocking_client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        workers = eval(_run(kc, START_POOL))  # noqa: S307 - our own cell's output
        assert workers and all(running(pid) for pid in workers)
        kc.stop_channels()
        km.restart_kernel(now=forced)  # now=True: the kernel is killed, no atexit
        deadline = time.monotonic() + 20
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if running(pid)]
        kernel = km.provisioner.process.pid
        assert set(marked_processes()) <= {kernel} | _children(kernel)
    finally:
        km.shutdown_kernel(now=True)
    assert not wait_no_processes(timeout=15)


def _children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.add(int(name))
            except OSError:
                continue
    return found


PROGRESS_CELLS = [
    """import scoop
pool = scoop.Executor(2)   # SCOOP_PROGRESS=1 is in the kernel's environment""",
    """def square(x):
    return x * x

print(sum(pool.map(square, range(300))), pool.submit(square, 3).result())""",
    """pool.shutdown()
from scoop import _progress
print("done", _progress.active is None)""",
]


def test_progress_shows_a_notebook_bar_with_no_code_change(tmp_path):
    """SCOOP_PROGRESS=1 in the kernel's environment: the pool shows tqdm's notebook bar
    (a widget), counts map items and calls, and the program's output is untouched."""
    pytest.importorskip("tqdm", reason="needs tqdm: pip install -e '.[test]'")
    pytest.importorskip("ipywidgets", reason="needs ipywidgets: pip install -e '.[test]'")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in PROGRESS_CELLS]
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "SCOOP_PROGRESS": "1"})
    widgets = [out for out in nb.cells[0].outputs if out.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in out.data]
    assert widgets, nb.cells[0].outputs
    assert _outputs(nb.cells[1]) == f"{sum(x * x for x in range(300))} 9\n"
    assert _outputs(nb.cells[2]) == "done True\n"
    state = nb.metadata.get("widgets", {}).get(
        "application/vnd.jupyter.widget-state+json", {}).get("state", {})
    values = [m["state"].get("value") for m in state.values()
              if m.get("model_name") == "FloatProgressModel"]
    assert values == [301], values  # every item and call counted (the saved widget)
    assert not wait_no_processes(timeout=15)
