"""`python -m bench`: every benchmark, one after another (about twelve minutes)."""

from __future__ import annotations

from bench import (
    cost,
    events,
    fairness,
    latency,
    memory,
    recovery,
    redis_memory,
    replicate,
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
    ):
        print(f"=== {module.__name__}", flush=True)
        module.main()


if __name__ == "__main__":
    main()
