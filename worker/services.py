"""The clients one worker process uses, built once from ``Settings`` and handed around."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker.budget import CostLedger
from worker.events import EventPublisher
from worker.generation import ImageGenerator, PredictionCheckpoints
from worker.jobs import JobStore
from worker.retention import Retention
from worker.settings import Settings
from worker.storage import ImageStore


@dataclass(frozen=True)
class Services:
    settings: Settings
    client: redis.Redis
    generator: ImageGenerator
    store: ImageStore
    ledger: CostLedger
    jobs: JobStore
    events: EventPublisher
    retention: Retention

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
        client = client or redis.Redis.from_url(
            settings.redis_url, decode_responses=True, health_check_interval=30
        )
        jobs = JobStore(client)
        store = store or make_store(settings)
        return cls(
            settings=settings,
            client=client,
            generator=generator or make_generator(settings, jobs),
            store=store,
            ledger=CostLedger(client),
            jobs=jobs,
            events=EventPublisher(client),
            retention=Retention(
                client,
                store,
                success_days=settings.retention_success_days,
                failure_days=settings.retention_failure_days,
            ),
        )


def make_generator(settings: Settings, checkpoints: PredictionCheckpoints) -> ImageGenerator:
    if settings.resolved_generator_backend() == "replicate":
        from worker.generation.replicate import ReplicateImageGenerator

        return ReplicateImageGenerator.from_settings(settings, checkpoints)
    from worker.generation.local import LocalImageGenerator

    return LocalImageGenerator(
        latency_s=settings.local_generator_latency_s,
        cost=settings.local_generator_cost,
        fail_ids=settings.local_generator_fail_ids,
        flaky_ids=settings.local_generator_flaky_ids,
        reject_ids=settings.local_generator_reject_ids,
    )


def make_store(settings: Settings) -> ImageStore:
    if settings.resolved_storage_backend() == "supabase":
        from worker.storage.supabase import SupabaseImageStore

        return SupabaseImageStore.from_settings(settings)
    from worker.storage.local import LocalImageStore

    return LocalImageStore(settings.local_storage_dir, settings.storage_bucket)
