"""Hot loops of the pieces of a remote round trip (issue 12), us per call, best of 7.

Run from the repository root (``PYTHONPATH=<another tree>`` times that tree's code)::

    python bench/bench_pieces.py

Each piece is run as the round trip runs it, on frames as ZeroMQ hands them over
(``zmq.Frame``): the root packs a ``who`` call and encodes TASKS; the broker decodes it
and encodes it on; worker 1 decodes it, checks the parcel and unpickles the call, then
packs its result and encodes RESULTS with its finished group; the broker decodes that
and encodes it on; the root decodes it, checks and unpickles.
"""

from __future__ import annotations

import os
import sys
import timeit

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_tasks as T  # noqa: E402

from scoop import _protocol as P  # noqa: E402
from scoop import _serialize, _shm, _transport  # noqa: E402, F401 (zmq.Frame: BYTE_SIZED)


def wire(frames):
    return [zmq.Frame(bytes(memoryview(f))) for f in frames]


def main() -> None:
    key = os.urandom(32)
    root, broker, worker = P.Codec(key, 0), P.Codec(key, 0xFFFFFFFF), P.Codec(key, 1)
    seqs = iter(range(1, 10**9))

    def pack_task():
        frames = _serialize.dumps([(T.who, (), {})])
        return root.parcel([P.task_ids_frame([7]), *frames], tag=1)

    task = pack_task()
    tasks_in = wire(root.encode(P.TASKS, parcels=[task]))
    fwd = broker.encode(P.TASKS, parcels=[task])
    tasks_at_worker = wire(fwd)

    def unpack_task(frames):
        msg = worker.decode(frames)
        for p in msg.parcels:
            worker.check(p)
            P.task_ids(p)
            _serialize.loads_items(_shm.restore(p.frames[1:]))

    def pack_results():
        frames = _serialize.dumps([(7, True, 1)])
        p = worker.parcel(frames, peer=0)
        return worker.encode(P.RESULTS, arg=1, parcels=[p], done=[(0, 1)])

    results_in = wire(pack_results())
    res_msg = broker.decode(results_in, join=False)
    results_at_root = wire(broker.encode(P.RESULTS, parcels=res_msg.parcels))

    def unpack_results(frames):
        msg = root.decode(frames)
        for p in msg.parcels:
            root.check(p)
            _serialize.loads_items(_shm.restore(p.frames))

    def broker_decode(frames):
        broker._last_seen.clear()
        return broker.decode(frames, peer=b"w%d" % next(seqs), join=False)

    pieces = {
        "root: pack a task group (dumps, ids, mac)": pack_task,
        "root: encode TASKS": lambda: root.encode(P.TASKS, parcels=[task]),
        "broker: decode TASKS": lambda: broker_decode(tasks_in),
        "broker: encode TASKS on": lambda: broker.encode(P.TASKS, parcels=[task]),
        "worker: decode, check, unpickle TASKS": lambda: unpack_task(tasks_at_worker),
        "worker: pack and encode RESULTS": pack_results,
        "broker: decode RESULTS": lambda: broker_decode(results_in),
        "broker: encode RESULTS on": lambda: broker.encode(P.RESULTS, parcels=res_msg.parcels),
        "root: decode, check, unpickle RESULTS": lambda: unpack_results(results_at_root),
    }
    n = 20000
    total = 0.0
    for name, fn in pieces.items():
        best = min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6
        total += best
        print(f"{name:42s} {best:6.2f}")
    print(f"{'all pieces':42s} {total:6.2f}")


if __name__ == "__main__":
    main()
