"""A map's chunks are pickled once (issue 12): an in-process root that the broker hands
its own chunks (it waits for a result, so it asks for work) runs them from the calls it
kept, and gives a group back as it came when its program resumes, without pickling the
items again.

The items count, in the process that pickles or unpickles them, each time they do.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

COUNTED = '''
import collections

PICKLED = collections.Counter()  # item -> times pickled in this process
UNPICKLED = 0


class Item:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

    def __reduce__(self):
        PICKLED[self.v] += 1
        return (_rebuild, (self.v,))


def _rebuild(v):
    global UNPICKLED
    UNPICKLED += 1
    return Item(v)


def value(item):
    return item.v + 1
'''

PROGRAM = '''
import sys
from scoop import futures
from scoop._launch import Launcher
from scoop._runtime.handlers import Handlers
from scoop._runtime.outbox import Shipper
import counted

seen = {"own": 0, "back": 0, "maps": 0, "most": 0}
handle, give_back = Handlers.handle_tasks, Shipper.give_back


def counting_handle(self, msg):  # groups of the root's own chunks, handed to it
    seen["own"] += sum(p.peer == self.rt.wid for p in msg.parcels)
    handle(self, msg)


def counting_give_back(self):  # a run queue handed back as the program resumes
    seen["back"] += bool(self.rt.runq)
    give_back(self)


Handlers.handle_tasks, Shipper.give_back = counting_handle, counting_give_back
items = [counted.Item(i) for i in range(20000)]
with Launcher(2, pythonpath=sys.path[0]):
    while seen["maps"] < 100 and (seen["own"] < 3 or seen["back"] < 2):
        counted.PICKLED.clear()
        assert list(futures.map(counted.value, items)) == list(range(1, 20001))
        seen["maps"] += 1
        seen["most"] = max(seen["most"], max(counted.PICKLED.values(), default=0))
print("SEEN", seen["own"], seen["back"], seen["most"], counted.UNPICKLED)
'''


def test_a_roots_own_chunks_are_pickled_once_and_never_unpickled_by_it(tmp_path):
    (tmp_path / "counted.py").write_text(textwrap.dedent(COUNTED))
    (tmp_path / "prog.py").write_text(textwrap.dedent(PROGRAM))
    out = subprocess.run([sys.executable, str(tmp_path / "prog.py")], capture_output=True,
                         text=True, timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    own, back, most, unpickled = map(int, out.stdout.split("SEEN")[1].split())
    assert own >= 3 and back >= 2  # the root was handed its chunks, and gave some back
    assert most == 1  # no item was pickled twice in one map (before: a second time)
    assert unpickled == 0  # the root ran its own chunks from their calls (before: copies)
