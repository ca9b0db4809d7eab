"""Fairness under load: one 48-image job enqueued, then at once ten 2-image jobs, on one
worker × 4 slots at 1 s per image, first in first out (``REFERENCE_GEN_FAIRNESS=false``) and
with fairness, in one run.

Figures per mode: the small jobs' median and worst latency (enqueue → final event, each from
its own enqueue), the big job's, and the slots' throughput (images per second from the first
enqueue to the last job's end ÷ what 4 slots at 1 s could do).

And what fairness changes elsewhere, at 0.5 s per image:
- a stream: the 48-image job, then a 2-image job every third of a second for ten seconds
  (three quarters of the slots): the price of fairness, paid by the big job;
- a burst of twelve equal 8-image jobs (one size class, so first come first served);
- one 4-image job alone (at 1 s).

``python -m bench.fairness starvation`` measures aging alone (issue 20): the 48-image job
under a stream of 2-image jobs that fills every slot (a job every quarter second at 0.5 s an
image on 4 slots) for 30 s, with fairness, aging off and aging every 2 s. Without aging the big
job waits for the stream to end; with it, its level rises every period (at most 1.25 periods,
the aging tick being a quarter of one) up to level 1, above the stream.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from bench.common import cluster, figure, load_plan, table
from tasks.harness import JobRunner
from tasks.jobwatch import JobWatch, sized_plan

LATENCY_S, SLOTS = 1.0, 4
BIG, SMALL, SMALL_JOBS = 48, 2, 10
BURST_JOBS, BURST_IMAGES, BURST_LATENCY_S = 12, 8, 0.5
STREAM_EVERY_S, STREAM_FOR_S = 1 / 3, 10.0
ALONE_ROUNDS = 5
STARVE_EVERY_S, STARVE_FOR_S, STARVE_AGING_S = 0.25, 30.0, 2.0


@dataclass(frozen=True)
class Scenario:
    small_median_s: float
    small_worst_s: float
    big_s: float
    efficiency: float


@dataclass(frozen=True)
class Burst:
    mean_s: float
    median_s: float
    last_s: float


def scenario(runner: JobRunner) -> Scenario:
    watch = JobWatch(runner.redis_url, runner.client)
    try:
        big = sized_plan(BIG // 2, BIG // 2, label="big")
        smalls = [sized_plan(SMALL // 2, SMALL // 2, label=f"small{i}") for i in range(SMALL_JOBS)]
        for plan in [big, *smalls]:
            watch.send(plan)
        jobs = watch.wait(timeout_s=120)
    finally:
        watch.close()
    small = [jobs[str(p["job_id"])].latency_s for p in smalls]
    first_sent = min(job.sent_at for job in jobs.values())
    makespan = max(job.sent_at + job.latency_s for job in jobs.values()) - first_sent
    rate = (BIG + SMALL * SMALL_JOBS) / makespan
    return Scenario(
        small_median_s=statistics.median(small),
        small_worst_s=max(small),
        big_s=jobs[str(big["job_id"])].latency_s,
        efficiency=rate / (SLOTS / LATENCY_S),
    )


def burst(runner: JobRunner) -> Burst:
    watch = JobWatch(runner.redis_url, runner.client)
    try:
        half = BURST_IMAGES // 2
        for i in range(BURST_JOBS):
            watch.send(sized_plan(half, half, label=f"burst{i}"))
        jobs = watch.wait(timeout_s=120)
    finally:
        watch.close()
    latencies = [job.latency_s for job in jobs.values()]
    return Burst(statistics.mean(latencies), statistics.median(latencies), max(latencies))


@dataclass(frozen=True)
class Stream:
    big_s: float
    small_median_s: float
    small_worst_s: float


def big_under_stream(
    runner: JobRunner, *, every_s: float, for_s: float, label: str, timeout_s: float
) -> tuple[float, list[float]]:
    """A big job, then a small one every ``every_s`` for ``for_s``: the big job's latency and
    the small ones'."""
    watch = JobWatch(runner.redis_url, runner.client)
    try:
        big = sized_plan(BIG // 2, BIG // 2, label="big")
        watch.send(big)
        started = time.perf_counter()
        for i in range(round(for_s / every_s)):
            time.sleep(max(0.0, started + i * every_s - time.perf_counter()))
            watch.send(sized_plan(SMALL // 2, SMALL // 2, label=f"{label}{i}"))
        jobs = watch.wait(timeout_s=timeout_s)
    finally:
        watch.close()
    big_s = jobs.pop(str(big["job_id"])).latency_s
    return big_s, [job.latency_s for job in jobs.values()]


def stream(runner: JobRunner) -> Stream:
    big_s, small = big_under_stream(
        runner, every_s=STREAM_EVERY_S, for_s=STREAM_FOR_S, label="stream", timeout_s=120
    )
    return Stream(big_s, statistics.median(small), max(small))


def starved(aging_s: float) -> tuple[float, float]:
    """The big job's latency under a saturating stream, and the stream's median job."""
    with cluster(
        LOCAL_GENERATOR_LATENCY_S=str(BURST_LATENCY_S),
        REFERENCE_GEN_CONCURRENCY=str(SLOTS),
        REFERENCE_GEN_AGING_S=str(aging_s),
    ) as (runner, _):
        runner(load_plan(), timeout_s=60)
        big_s, small = big_under_stream(
            runner, every_s=STARVE_EVERY_S, for_s=STARVE_FOR_S, label="starve", timeout_s=300
        )
    return big_s, statistics.median(small)


def starvation() -> None:
    rows = []
    for label, aging_s in (
        ("aging off", 1e9),
        (f"aging every {STARVE_AGING_S:g} s", STARVE_AGING_S),
    ):
        big_s, small_s = starved(aging_s)
        mode = "off" if aging_s > 1e6 else "on"
        figure("fairness_starved_big", big_s, "s", aging=mode)
        figure("fairness_starved_small_median", small_s, "s", aging=mode)
        rows.append((f"{label}: big job / stream's median job", f"{big_s:.2f} / {small_s:.2f} s"))
    bound = (7 - 1) * STARVE_AGING_S * 1.25  # level 7 to level 1, then its own service
    rows.append(("bound on the big job's wait for level 1", f"{bound:.1f} s + its service"))
    table(
        f"Starvation: one {BIG}-image job under a stream filling {SLOTS} slots for "
        f"{STARVE_FOR_S:g} s ({BURST_LATENCY_S:g} s images)",
        rows,
    )


def alone(runner: JobRunner) -> float:
    rounds = []
    for _ in range(ALONE_ROUNDS):
        started = time.perf_counter()
        assert runner(load_plan(), timeout_s=60).result["status"] == "success"
        rounds.append(time.perf_counter() - started)
    return statistics.median(rounds)


@dataclass(frozen=True)
class Measured:
    scenario: Scenario
    stream: Stream
    burst: Burst
    alone_s: float


def measure(fair: bool) -> Measured:
    switch = "true" if fair else "false"
    with cluster(
        LOCAL_GENERATOR_LATENCY_S=str(LATENCY_S),
        REFERENCE_GEN_CONCURRENCY=str(SLOTS),
        REFERENCE_GEN_FAIRNESS=switch,
    ) as (runner, _):
        runner(load_plan(), timeout_s=60)  # warm-up: connections, imports, first render
        measured = scenario(runner)
        alone_s = alone(runner)
    with cluster(
        LOCAL_GENERATOR_LATENCY_S=str(BURST_LATENCY_S),
        REFERENCE_GEN_CONCURRENCY=str(SLOTS),
        REFERENCE_GEN_FAIRNESS=switch,
    ) as (runner, _):
        runner(load_plan(), timeout_s=60)
        streamed = stream(runner)
        bursted = burst(runner)
    return Measured(measured, streamed, bursted, alone_s)


def main() -> None:
    results = {mode: measure(fair=mode == "fair") for mode in ("fifo", "fair")}
    rows = []
    for mode, m in results.items():
        s, st, b = m.scenario, m.stream, m.burst
        figure("fairness_small_median", s.small_median_s, "s", mode=mode, target=3)
        figure("fairness_small_worst", s.small_worst_s, "s", mode=mode)
        figure("fairness_big", s.big_s, "s", mode=mode)
        figure("fairness_slot_efficiency", s.efficiency * 100, "%", mode=mode)
        figure("fairness_stream_big", st.big_s, "s", mode=mode)
        figure("fairness_stream_small_median", st.small_median_s, "s", mode=mode)
        figure("fairness_stream_small_worst", st.small_worst_s, "s", mode=mode)
        figure("fairness_burst_mean", b.mean_s, "s", mode=mode)
        figure("fairness_burst_last", b.last_s, "s", mode=mode)
        figure("fairness_alone", m.alone_s, "s", mode=mode)
        rows += [
            (
                f"{mode}: small jobs, median / worst",
                f"{s.small_median_s:.2f} / {s.small_worst_s:.2f} s",
            ),
            (f"{mode}: big job", f"{s.big_s:.2f} s"),
            (f"{mode}: slot throughput", f"{s.efficiency:.1%}"),
            (
                f"{mode}: stream, big job / small median / small worst",
                f"{st.big_s:.2f} / {st.small_median_s:.2f} / {st.small_worst_s:.2f} s",
            ),
            (
                f"{mode}: burst of {BURST_JOBS} × {BURST_IMAGES} images, mean / last job",
                f"{b.mean_s:.2f} / {b.last_s:.2f} s",
            ),
            (f"{mode}: one 4-image job alone (median of {ALONE_ROUNDS})", f"{m.alone_s:.3f} s"),
        ]
    fifo, fair = results["fifo"], results["fair"]
    ratios = {
        "big": fair.scenario.big_s / fifo.scenario.big_s,
        "throughput": fair.scenario.efficiency / fifo.scenario.efficiency,
        "stream_big": fair.stream.big_s / fifo.stream.big_s,
        "burst_mean": fair.burst.mean_s / fifo.burst.mean_s,
        "alone": fair.alone_s / fifo.alone_s,
    }
    figure("fairness_big_ratio", ratios["big"], "x", target=1.1)
    figure("fairness_throughput_ratio", ratios["throughput"], "x", target=0.98)
    figure("fairness_stream_big_ratio", ratios["stream_big"], "x")
    figure("fairness_burst_mean_ratio", ratios["burst_mean"], "x")
    figure("fairness_alone_ratio", ratios["alone"], "x")
    rows += [
        ("big job, fair ÷ fifo", f"{ratios['big']:.3f} × (target ≤ 1.1)"),
        ("slot throughput, fair ÷ fifo", f"{ratios['throughput']:.3f} × (target ≥ 0.98)"),
        ("stream: big job, fair ÷ fifo", f"{ratios['stream_big']:.3f} ×"),
        ("burst: mean job, fair ÷ fifo", f"{ratios['burst_mean']:.3f} ×"),
        ("one job alone, fair ÷ fifo", f"{ratios['alone']:.3f} ×"),
    ]
    table(
        f"Fairness: one {BIG}-image job, then {SMALL_JOBS} × {SMALL} images; "
        f"1 worker × {SLOTS} slots at {LATENCY_S:g} s",
        rows,
    )


if __name__ == "__main__":
    import sys

    starvation() if sys.argv[1:] == ["starvation"] else main()
