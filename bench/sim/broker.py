"""The broker of a simulation: the real ``scoop._broker.Broker`` in a process of its own.

As the launcher does (``scoop._launch.launcher``), minus the workers: it binds loopback,
runs the loop, and is stopped by its owner. Its own process, so that the driver can read
the broker's CPU time and memory in /proc without counting anyone else's. It reports its
address on stdout; ``lost WID`` on stdin reports a worker gone, as the launcher does when
a worker process exits; the end of stdin stops it.
"""

from __future__ import annotations

import cProfile
import itertools
import logging
import sys
import threading

from scoop import _broker, _schedule
from scoop._transport import Credentials

from . import child


def main() -> None:
    cfg = child.read_config()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="[%(asctime)s] %(levelname)-7s %(name)s %(message)s")
    if cfg.get("silence_s"):  # how long a worker may stay silent before it counts as lost
        _schedule.WORKER_SILENCE_S = float(cfg["silence_s"])
    broker = _broker.Broker(Credentials.from_config(cfg), size=int(cfg["size"]))
    # A thread of this process, as in the launcher: stop() then reaches it as a command.
    if cfg.get("profile"):  # where to write the loop's cProfile stats
        broker._thread = threading.Thread(target=_profiled, args=(broker, cfg["profile"]),
                                          name="scoop-broker", daemon=True)
        broker._thread.start()
    else:
        broker.start()
    commands = child.commands()
    if cfg.get("trace_dir"):  # where to write tracemalloc snapshots, every trace_s
        threading.Thread(target=_trace, args=(cfg["trace_dir"], cfg.get("trace_s", 60)),
                         name="sim-trace", daemon=True).start()
    child.report("listening", address=broker.address)
    while (cmd := commands.get()) is not None:
        if cmd.startswith("lost "):
            broker.worker_lost(int(cmd.split()[1]), "reported lost by the simulation")
    broker.stop()
    child.report("stopped", finished=broker.finished.is_set())


def _trace(folder: str, every: float) -> None:
    """Python's own allocations (tracemalloc) and glibc's heap (mallinfo2), every
    ``every`` seconds: whether a growing RSS is objects kept or memory not returned."""
    import ctypes
    import time
    import tracemalloc

    class _MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    tracemalloc.start(8)
    start = time.monotonic()
    for i in itertools.count():
        time.sleep(every)
        info = libc.mallinfo2()
        tracemalloc.take_snapshot().dump(f"{folder}/snap-{i:03d}.pickle")
        traced, _ = tracemalloc.get_traced_memory()
        child.report("trace", t=round(time.monotonic() - start), traced=traced,
                     arena=info.arena, hblkhd=info.hblkhd, used=info.uordblks,
                     free=info.fordblks)


def _profiled(broker: _broker.Broker, path: str) -> None:
    profile = cProfile.Profile()
    try:
        profile.runcall(broker.run)
    finally:
        profile.dump_stats(path)


if __name__ == "__main__":
    sys.exit(main())
