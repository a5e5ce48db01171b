"""What every process of a simulation shares: its config and commands on stdin, its
reports on stdout (one JSON line each), and reading the broker's messages."""

from __future__ import annotations

import json
import os
import queue
import sys
import threading

import zmq

from scoop import _protocol as P


def read_config() -> dict:
    """The first line of stdin: the child's config (the job key among it)."""
    line = sys.stdin.readline()
    if not line:
        os._exit(0)  # the driver is gone before it said anything
    return json.loads(line)


def commands() -> queue.SimpleQueue:
    """The later lines of stdin, as they come, then None at its end.

    A thread reads them so that the child's loop never blocks on its stdin; the end of
    stdin means the driver is gone, and the child must not outlive it.
    """
    q: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin:
            q.put(line.strip())
        q.put(None)

    threading.Thread(target=read, name="sim-stdin", daemon=True).start()
    return q


def report(event: str, **fields) -> None:
    """One JSON line on stdout for the driver."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def messages(sock: zmq.Socket, codec: P.Codec, limit: int, rejected: list):
    """The broker's messages waiting on ``sock`` (at most ``limit``), checked and
    decoded; each one that fails the check adds 1 to ``rejected[0]``."""
    for _ in range(limit):
        if not sock.poll(0):
            return
        frames = sock.recv_multipart(copy=False)
        try:
            msg = codec.decode(frames, peer="broker")
        except P.AuthError:
            rejected[0] += 1
            continue
        yield msg
