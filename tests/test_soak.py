"""The soak run (bench/soak.py) in short: a stream of futures while workers are killed.

20 s by default; ``SCOOP_SOAK_SECONDS=600 python -m pytest -s tests/test_soak.py`` runs a
longer one (the timeouts grow with it). ``-s`` shows the soak's summary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SOAK = os.path.join(REPO, "bench", "soak.py")
SECONDS = float(os.environ.get("SCOOP_SOAK_SECONDS") or 20)
WORKERS = 3  # the root and 2 worker processes: one per core on a 2-core machine
KILL_EVERY = 3.0
HANG_S = 20.0  # no result for 20 s: the soak dumps its state and stops (exit 1)
DRAIN_S = 30.0  # the last futures normally need well under a second
# worst case with a hang: the soak's emergency exit comes HANG_S + 30 s after the last
# result; the subprocess timeout leaves room for that, pytest's for the timeout itself
PROC_TIMEOUT = SECONDS + HANG_S + 50
MIN_TASKS_PER_S = 40  # ~240/s here (the tasks sleep 0-20 ms): a floor for slow machines


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_bench", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the tasks and constants; main() is not run
    return mod


@pytest.mark.timeout(int(PROC_TIMEOUT + 20))
@pytest.mark.usefixtures("no_leftovers")
def test_soak_under_worker_kills(tmp_path):
    limit = _soak_module().RSS_GROWTH_LIMIT
    out_json = tmp_path / "soak.json"
    cmd = [sys.executable, SOAK, "--seconds", str(SECONDS), "--workers", str(WORKERS),
           "--kill-every", str(KILL_EVERY), "--hang-s", str(HANG_S),
           "--drain-s", str(DRAIN_S), "--report-every", "5", "--json", str(out_json)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROC_TIMEOUT,
                              cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")

        pytest.fail(f"the soak ran past {PROC_TIMEOUT:.0f} s\n--- stdout\n"
                    f"{text(exc.stdout)}\n--- stderr\n{text(exc.stderr)}")
    output = f"--- soak stdout\n{proc.stdout}\n--- soak stderr\n{proc.stderr}"
    print(proc.stdout)  # the soak's own summary table (shown with pytest -s)
    assert out_json.exists(), f"no JSON summary (exit status {proc.returncode})\n{output}"
    s = json.loads(out_json.read_text())
    figures = {k: s[k] for k in (
        "duration_s", "tasks_done", "tasks_submitted", "tasks_per_s", "workers_killed",
        "kills_noticed_by_launcher", "replacements_started", "results_lost",
        "duplicates_delivered", "callbacks_called_twice", "wrong_results",
        "misrouted_results", "tasks_failed", "worker_lost_errors", "rss_baseline_kb",
        "rss_end_kb", "rss_growth_after_warmup", "leftover_processes")}
    figures["scoop_warnings_unexpected"] = len(s["scoop_warnings_unexpected"])
    print("soak figures:", json.dumps(figures))
    msg = f"{json.dumps(figures)}\nchecks: {s['checks']}\n{output}"

    assert proc.returncode == 0, f"the soak failed (exit status {proc.returncode})\n{msg}"
    assert s["passed"] and all(s["checks"].values()), msg
    assert s["tasks_done"] == s["tasks_submitted"], msg
    assert s["tasks_done"] >= MIN_TASKS_PER_S * SECONDS, msg
    # a kill every 1.5-4.5 s (3 s on average) from t = 3 s: 5-6 in 20 s here; ask for half
    assert s["workers_killed"] >= max(1, int(SECONDS / KILL_EVERY / 2)), msg
    assert s["replacements_started"] == s["workers_killed"], msg
    assert s["results_lost"] == 0, msg
    assert s["duplicates_delivered"] == 0 and s["callbacks_called_twice"] == 0, msg
    assert s["wrong_results"] == 0 and s["misrouted_results"] == 0, msg
    assert s["tasks_failed"] == 0 and s["task_errors"] == {}, msg
    assert s["map_items_abandoned"] == 0, msg
    assert s["rss_growth_after_warmup"] is not None, msg
    assert s["rss_growth_after_warmup"] <= limit, msg
    assert s["leftover_processes"] == [], msg
    assert not s["hang"] and not s["emergency_exit"], msg
    assert s["monitor_error"] is None and s["main_error"] is None, msg
