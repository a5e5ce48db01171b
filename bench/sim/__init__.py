"""A simulated job: the real broker, many simulated workers, one simulated owner.

Measures how the broker scales with the number of workers, which a 2-core machine cannot
show with real worker processes (each costs an interpreter and tens of MB)::

    driver (bench/simulate.py -> harness.run)
      |-- broker process      python -m sim.broker   the real scoop._broker.Broker and
      |                       its Schedule, bound to loopback; CPU and RSS read in /proc
      |-- worker processes    python -m sim.workers  ~500 simulated workers each: two
      |                       DEALERs per worker (w<wid> and the watchdog's h<wid>), one
      |                       Poller; HELLO, READY, TASKS -> RESULTS after the task
      |                       length, PING every second; no user code is unpickled
      '-- the owner (worker 0), in the driver's thread (owner.py): submits task groups,
          checks each result parcel's mac, counts every task's answers

*Protocol.* Everything on the wire is what real workers send (``scoop._protocol``):
signed messages, per-job key, parcels with task-id frames and macs, results pickled by
``scoop._serialize`` as a real worker packs them. Only the tasks are not run: a simulated
worker answers a group ``task_s`` seconds per task after it starts it (groups run one
after the other, as on a real worker), each task's value being its own task id.

*Loss.* ``lose`` makes a worker process drop one of its workers that holds groups: its
sockets close without BYE and its pings stop, as when a remote host vanishes. The broker
notices the silence (``scoop._schedule.WORKER_SILENCE_S``) and queues its groups again.

*Secrets.* The job key reaches each child on its stdin (a JSON line), never on a command
line; the children's commands and reports are JSON lines on stdin and stdout. A child
whose stdin closes (the driver ended, even by SIGKILL) exits.
"""
