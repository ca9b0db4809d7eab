"""How long a job stalls when its whole worker is SIGKILLed: from the kill to the result, with
a new worker started at once. Default settings (lease TTL 20 s) unless LEASE_TTL_S is set."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from bench.common import cluster, figure, load_plan, table
from tasks.harness import JobRun, WorkerProcess


def main() -> None:
    ttl = os.environ.get("LEASE_TTL_S", "20")
    with cluster(LOCAL_GENERATOR_LATENCY_S="2", LEASE_TTL_S=ttl) as (runner, workers):
        plan = load_plan("large_5x3")
        box: list[JobRun] = []
        thread = threading.Thread(target=lambda: box.append(runner(plan, timeout_s=400)))
        thread.start()
        time.sleep(3.0)  # round one stored, round two generating
        doomed = workers[0]
        os.killpg(doomed.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        killed = time.monotonic()
        log = Path(doomed.log_path).with_name("rescuer.log")
        rescuer = WorkerProcess(doomed.env, log, "rescuer").start(runner.client)
        workers.append(rescuer)
        thread.join()
        stall = time.monotonic() - killed
    assert box[0].result["status"] == "success"
    figure("whole_worker_sigkill_recovery", stall, "s", lease_ttl_s=float(ttl))
    table(
        "Whole-worker SIGKILL mid-job, new worker started at once",
        [(f"lease TTL {ttl} s", f"job finished {stall:.1f} s after the kill")],
    )


if __name__ == "__main__":
    main()
