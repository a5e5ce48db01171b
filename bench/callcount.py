"""Python and C calls per remote round trip, per thread: the root's main thread, the
broker thread and worker 1's main thread (deterministic: load does not move them).

Run from the repository root: ``python bench/callcount.py [-v] [--calls N]``. The loop is
``bench_rtt.py rtt``'s: ``submit(who)``, ``futures.wait([f], timeout=60)``, in-process
root, worker 1 runs it. ``-v`` lists the calls by function.
"""

from __future__ import annotations

import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

from scoop import _broker, futures  # noqa: E402
from scoop._launch import Launcher  # noqa: E402

ON = [False]
COUNTS: collections.Counter = collections.Counter()


def _name(frame, event, arg) -> str:
    if event == "call":
        return f"{frame.f_code.co_qualname} ({frame.f_code.co_filename.rsplit('/', 1)[-1]})"
    return "C:" + getattr(arg, "__qualname__", str(arg))


def _counter(thread: str):
    def prof(frame, event, arg):
        if ON[0] and event in ("call", "c_call"):
            COUNTS[thread, "py" if event == "call" else "c"] += 1
            COUNTS[thread, _name(frame, event, arg)] += 1
    return prof


_run = _broker.Broker.run


def _counted_run(self):  # the broker thread counts itself (it starts before the loop)
    sys.setprofile(_counter("broker"))
    _run(self)


def worker_start():
    import collections as c
    import sys as s

    import bench_tasks
    w = bench_tasks.W = c.Counter()

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            w["py" if event == "call" else "c"] += 1
            code = frame.f_code
            w[f"{code.co_qualname} ({code.co_filename.rsplit('/', 1)[-1]})" if event == "call"
              else "C:" + getattr(arg, "__qualname__", str(arg))] += 1
    s.setprofile(prof)
    return 1


def worker_stop():
    import sys as s

    import bench_tasks
    s.setprofile(None)
    return dict(bench_tasks.W)


def main() -> None:
    n = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 1000
    _broker.Broker.run = _counted_run
    with Launcher(2, pythonpath=HERE):
        def remote(fn):
            while True:
                f = futures.submit(fn)
                futures.wait([f], timeout=60)
                if f.result() is not None and (fn is not T.who or f.result() != 0):
                    return f.result()
        for _ in range(300):
            remote(T.who)
        remote(worker_start)
        sys.setprofile(_counter("root"))
        ON[0] = True
        for _ in range(n):
            f = futures.submit(T.who)
            futures.wait([f], timeout=60)
        ON[0] = False
        sys.setprofile(None)
        w = remote(worker_stop)
    for k, v in w.items():
        COUNTS["worker1", k] = v
    for thread in ("root", "broker", "worker1"):
        py, c = COUNTS[thread, "py"] / n, COUNTS[thread, "c"] / n
        print(f"{thread:8s} python {py:7.2f}  C {c:7.2f}")
    if "-v" in sys.argv:
        for thread in ("root", "broker", "worker1"):
            rows = sorted(((v, k[1]) for k, v in COUNTS.items()
                           if k[0] == thread and k[1] not in ("py", "c")), reverse=True)
            for v, name in rows:
                if v / n >= 0.5:
                    print(f"{thread:8s} {v / n:6.2f} {name}")


if __name__ == "__main__":
    main()
