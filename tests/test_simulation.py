"""The scaling simulation (bench/simulate.py) in small: the real broker, 50 simulated
workers in two processes, a few thousand tasks, one worker lost while it holds groups.

Behaviour only, never timings: every task is answered exactly once and with its own
value, the lost worker's tasks are answered by others, every process ends.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))

from sim import harness  # noqa: E402 - bench/ is not a package

WORKERS = 50


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("no_leftovers")
@pytest.mark.parametrize("resumable", [False, True], ids=["futures", "map-chunks"])
def test_simulated_job_with_a_lost_worker(resumable: bool):
    """futures: the broker queues the lost worker's groups again; map chunks: it tells
    their owner (LOST), which hands back what is unanswered."""
    cfg = harness.Config(
        workers=WORKERS, per_process=25, seconds=3.0, warmup_s=0.5, group=16, credit=2,
        task_s=0.002,  # every worker holds groups when one is lost
        lose=True, silence_s=3.0,  # the broker notices the silence sooner than in a job
        resumable=resumable, timeout_s=20.0)
    r = harness.run(cfg)
    detail = (f"error={r.error} lost={r.lost} stats={r.worker_stats}\n"
              f"broker log:\n{r.broker_log}")

    assert r.error is None, detail
    assert r.processes == 2 and r.registration_s is not None, detail
    assert r.submitted >= 1000, detail
    assert r.answered == r.submitted and r.missing == 0, detail
    assert r.duplicates == 0 and r.wrong == 0 and r.failed == 0, detail
    assert r.rejected == 0, detail

    lost = r.lost
    assert lost is not None and lost["wid"] is not None, detail
    assert lost["groups"] >= 1 and lost["tids"] >= 1, detail
    assert lost["answered"] == lost["tids"] and lost["answered_twice"] == 0, detail
    assert lost["noticed_s"] is not None, detail  # the broker's log names it gone
    assert f"worker {lost['wid']} " in r.broker_log, detail
    if resumable:
        assert r.lost_groups == lost["groups"] and r.returned == lost["tids"], detail
    else:
        assert r.lost_groups == 0 and r.returned == 0, detail

    # Every other worker was stopped by the broker at the end; none was refused.
    stats = r.worker_stats
    assert sum(s["stops"] for s in stats) == WORKERS - 1, detail
    assert sum(s["lost"] for s in stats) == 1, detail
    assert sum(s["refused"] + s["rejected"] for s in stats) == 0, detail
    assert "Traceback" not in r.broker_log, detail
    assert r.leftover == [], detail
