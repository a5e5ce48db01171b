"""A worker's runtime: runs futures in greenlets and trades task groups and results with
the broker.

Reimplements SCOOP's ``scoop._control`` / ``scoop._types`` scheduling. Deliberate
differences: futures are shipped in pickled *groups* (one pickle per group, not per
future), workers pull work with credits instead of being pushed it, results are batched
per owner, and an exception keeps its type and carries the worker-side traceback.

Data flow inside one worker process::

    program / task greenlet          hub greenlet (this worker's loop)            broker
    -----------------------          ---------------------------------            ------
    submit(fn, *a) -> outbox
    result() on a future still
      in the outbox: run it here  -> (SCOOP laziness; the rest of the outbox ships)
    result() otherwise: park ----->  ship outbox: guided groups, one pickle each -> TASKS
                                     READY(1) when the run queue is nearly empty -> credit
                                     runq <- task groups (parcels) ------------- <- TASKS
                                     one greenlet per task: fn(*a) -> results_out
                                     RESULTS per owner + finished groups -------> route
    waiter woken <- future set  <--  RESULTS for futures this worker owns ------ <- RESULTS

*Submitting greenlet.* ``submit`` only creates a :class:`Future` in the outbox. Asking
for a result of a future still in the outbox runs it inline, in the asking greenlet;
otherwise the greenlet parks and the hub runs. Parking ships the outbox first, so what a
greenlet submitted leaves as soon as it waits.

*Hub.* A loop in its own greenlet: it resumes greenlets whose futures completed, starts a
greenlet per queued task, ships the outbox in guided groups (each takes a share of what
remains, so early groups are big and the last ones small for load balance), sends
results and asks the broker for more work when its queue is about to run dry.

*Task greenlet.* Runs one call. If it waits on futures, it parks and the hub keeps the
worker busy with other tasks; that is why tasks may spawn tasks at any depth without
deadlock, even on a single worker.

Without a broker (``python program.py``), the same runtime runs everything in-process:
shipping just moves the outbox to the run queue.

One role per module (each opens with the flow it owns):

* ``worker.py``: :class:`Worker`, which composes the others: the API the futures call
  (submit, wait, cancel), completing futures, shared constants, the life cycle.
* ``hub.py``: the hub loop, waiters, parking, timers, the end of every wait.
* ``outbox.py``: the outbox shipped in groups, results and credit requests sent, tasks
  handed back.
* ``policy.py``: the scheduling decisions (credit, standby, grouping, give-back), with no
  I/O (unit-tested in ``tests/test_runtime_policy.py``), and the tuning constants.
* ``handlers.py``: what each message from the broker does.
* ``consts.py``: shared constants (``shared.setConst`` / ``getConst``).
* ``link.py``: the socket to the broker, joining the job, waiting for answers.
* ``stream_link.py``: the same over the broker's Unix socket (workers on its host).

``scoop._worker`` is the process's entry point to all this: ``current()``, ``install()``.
"""

from .worker import Worker

__all__ = ["Worker"]
