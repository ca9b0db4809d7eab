"""The clients one worker process uses, built once from ``Settings`` and handed around."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from worker.budget import CostLedger
from worker.events import EventPublisher
from worker.generation import ImageGenerator
from worker.job_index import JobIndex
from worker.jobs import JobStore
from worker.metrics import JobMetrics
from worker.recovery import Deadlines, Holdings, ImageLocks, Leases
from worker.replication import Replication
from worker.retention import Retention
from worker.settings import Settings
from worker.storage import ImageStore, StoreReadiness


@dataclass(frozen=True)
class Services:
    settings: Settings
    client: redis.Redis
    replication: Replication
    generator: ImageGenerator
    store: ImageStore
    store_readiness: StoreReadiness
    ledger: CostLedger
    jobs: JobStore
    events: EventPublisher
    retention: Retention
    holdings: Holdings
    leases: Leases
    locks: ImageLocks
    deadlines: Deadlines
    metrics: JobMetrics

    @classmethod
    def build(
        cls,
        settings: Settings,
        *,
        client: redis.Redis | None = None,
        generator: ImageGenerator | None = None,
        store: ImageStore | None = None,
    ) -> Services:
        """Real adapters chosen by the settings; any of them can be handed in instead."""
        client = client or redis_client(settings)
        replication = Replication(
            client,
            replicas=settings.wait_replicas,
            timeout_ms=settings.redis_wait_timeout_ms,
        )
        jobs = JobStore(client, ttl_s=settings.job_state_ttl_s, replication=replication)
        store = store or make_store(settings)
        holdings = Holdings()
        return cls(
            settings=settings,
            client=client,
            replication=replication,
            generator=generator
            or make_generator(settings, client, JobMetrics(client), replication),
            store=store,
            store_readiness=StoreReadiness(store),
            ledger=CostLedger(client, ttl_s=settings.job_state_ttl_s, replication=replication),
            jobs=jobs,
            events=EventPublisher(client, JobIndex(client)),
            retention=Retention(
                client,
                store,
                success_days=settings.retention_success_days,
                failure_days=settings.retention_failure_days,
            ),
            holdings=holdings,
            leases=Leases(client, ttl_s=settings.lease_ttl_s),
            locks=ImageLocks(client, settings.lease_ttl_s, holdings),
            deadlines=Deadlines(client),
            metrics=JobMetrics(client),
        )


def redis_client(settings: Settings) -> redis.Redis:
    """Our Redis client, through Sentinel when it is configured. It rides out a restart or a
    failover: connection errors are retried with backoff for about half a minute before a
    call gives up, and each reconnection asks the Sentinels where the primary is now."""
    return settings.redis_endpoint().client(
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def make_generator(
    settings: Settings,
    client: redis.Redis,
    metrics: JobMetrics,
    replication: Replication | None = None,
) -> ImageGenerator:
    if settings.resolved_generator_backend() == "replicate":
        from worker.generation.checkpoints import RedisPredictionCheckpoints
        from worker.generation.replicate import ReplicateImageGenerator
        from worker.ratelimit import ReplicateBudget

        budget = ReplicateBudget.in_redis(
            client,
            creates_per_minute=settings.replicate_creates_per_minute,
            requests_per_minute=settings.replicate_requests_per_minute,
        )
        checkpoints = RedisPredictionCheckpoints(
            client, ttl_s=settings.job_state_ttl_s, replication=replication
        )
        return ReplicateImageGenerator.from_settings(
            settings, checkpoints, budget, on_rate_limited=metrics.rate_limited
        )
    from worker.generation.local import LocalImageGenerator

    return LocalImageGenerator(
        latency_s=settings.local_generator_latency_s,
        cost=settings.local_generator_cost,
        fail_ids=settings.local_generator_fail_ids,
        flaky_ids=settings.local_generator_flaky_ids,
        reject_ids=settings.local_generator_reject_ids,
        journal=settings.local_generator_journal,
    )


def make_store(settings: Settings) -> ImageStore:
    if settings.resolved_storage_backend() == "supabase":
        from worker.storage.supabase import SupabaseImageStore

        return SupabaseImageStore.from_settings(settings)
    from worker.storage.local import LocalImageStore

    return LocalImageStore(
        settings.local_storage_dir, settings.storage_bucket, settings.local_storage_public_url
    )
