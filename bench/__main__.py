"""`python -m bench`: every benchmark, one after another (about forty minutes, the soak the
longest)."""

from __future__ import annotations

from bench import (
    cost,
    events,
    fairness,
    gateway,
    latency,
    memory,
    plain_chord,
    recovery,
    redis_memory,
    replicate,
    replication,
    soak,
    throughput,
)


def main() -> None:
    for module in (
        latency,
        replicate,
        throughput,
        fairness,
        memory,
        events,
        cost,
        redis_memory,
        recovery,
        replication,
    ):
        print(f"=== {module.__name__}", flush=True)
        module.main()
    for long_running in (plain_chord, soak, gateway):
        print(f"=== {long_running.__name__}", flush=True)
        long_running.main([])


if __name__ == "__main__":
    main()
