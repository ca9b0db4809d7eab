"""Per-job metrics for what Flower cannot see (it counts tasks, not jobs): images made and
failed, fallbacks to text-only, Replicate 429s, cost, job duration.

Workers add to one Redis hash, so the figures are the cluster's; the gateway serves them at
``/metrics`` in Prometheus' format through a collector that reads the hash at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from worker import constants as c

METRICS = c.METRICS
DURATION_BUCKETS_S = (5, 10, 30, 60, 120, 300, 600, 1800)
JOB_OUTCOMES = ("success", "partial", "text_only", "cancelled")


class JobMetrics:
    """Counters the workers add to. A finished job's figures are added as its result is
    committed (``commit_result.lua``), so each job counts once however often it is finalized."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def rate_limited(self) -> None:
        self._redis.hincrby(METRICS, "replicate:429", 1)


class JobMetricsCollector(Collector):
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        raw = {str(k): float(v) for k, v in self._redis.hgetall(METRICS).items()}
        jobs = CounterMetricFamily("refgen_jobs", "Jobs finished, by outcome", labels=["outcome"])
        for outcome in JOB_OUTCOMES:
            jobs.add_metric([outcome], raw.get(f"jobs:{outcome}", 0.0))
        yield jobs
        images = CounterMetricFamily(
            "refgen_images", "Reference images, by result", labels=["result"]
        )
        images.add_metric(["made"], raw.get("images:made", 0.0))
        images.add_metric(["failed"], raw.get("images:failed", 0.0))
        yield images
        yield CounterMetricFamily(
            "refgen_text_only_fallbacks",
            "Jobs that fell back to text-only prompts (null result)",
            value=raw.get("jobs:text_only", 0.0),
        )
        yield CounterMetricFamily(
            "refgen_replicate_rate_limited",
            "HTTP 429 answers from Replicate",
            value=raw.get("replicate:429", 0.0),
        )
        yield CounterMetricFamily(
            "refgen_cost_dollars", "Money spent on images", value=raw.get("cost:nano", 0.0) / 1e9
        )
        buckets = [(str(b), raw.get(f"duration:le:{b}", 0.0)) for b in DURATION_BUCKETS_S]
        count = raw.get("duration:count", 0.0)
        yield HistogramMetricFamily(
            "refgen_job_duration_seconds",
            "Job duration, start to end",
            buckets=[*buckets, ("+Inf", count)],
            sum_value=raw.get("duration:sum", 0.0),
        )
