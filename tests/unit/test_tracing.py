"""A job's trace, with the SDK's in-memory exporter: the task spans opened and closed by the
same signal handlers a worker runs (tasks/tracing.py), the image stages by the real pipeline
on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tasks import tracing as task_tracing
from worker import constants as c
from worker import tracing
from worker.generation.local import LocalImageGenerator
from worker.models import ImageSpec
from worker.pipeline import ImagePipeline
from worker.services import Services
from worker.settings import Settings
from worker.storage.local import LocalImageStore

UPSTREAM_TRACE = "0af7651916cd43dd8448eb211c80319c"
UPSTREAM_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01"
PROMPT = "a secret-looking prompt nobody may read in a trace"


@pytest.fixture
def services(redis_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Services:
    built = Services.build(
        Settings(generator_backend="local", storage_backend="local"),
        client=redis_client,
        generator=LocalImageGenerator(latency_s=0),
        store=LocalImageStore(tmp_path),
    )
    monkeypatch.setattr(task_tracing, "services", lambda: built)
    return built


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(TracerProvider(), [SimpleSpanProcessor(exporter)])
    yield exporter
    tracing.shutdown()


def spec(job_id: str, image_type: str, image_id: str, index: int) -> ImageSpec:
    return ImageSpec(
        job_id=job_id,
        image_type=image_type,  # type: ignore[arg-type]
        image_id=image_id,
        prompt=PROMPT,
        negative_prompt="n",
        seed=7,
        index=index,
        total=2,
    )


def run_task(name: str, request: dict[str, Any], args: list[Any], body: Any = None) -> None:
    """What Celery does around a task: prerun, the task, postrun."""
    task = SimpleNamespace(name=name, request=SimpleNamespace(**request))
    task_tracing._open_span(task_id=request["id"], task=task, args=tuple(args), kwargs={})
    try:
        if body is not None:
            body()
    finally:
        task_tracing._close_span(task_id=request["id"], state="SUCCESS")


def test_tracing_is_off_unless_the_standard_variables_ask_for_it() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "refgen"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.wanted({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})
    assert not tracing.init({})
    assert not tracing.enabled()


def test_no_trace_and_nothing_written_while_tracing_is_off(services: Services) -> None:
    tracing.shutdown()
    job_id = str(uuid.uuid4())
    run_task(c.TASK_START, {"id": "s", "traceparent": TRACEPARENT}, [job_id])
    image = spec(job_id, "scene", "street", 1)
    ImagePipeline(services).run(image, attempt=0)
    assert not services.client.exists(c.JobKeys(job_id).trace)
    headers: dict[str, Any] = {}
    task_tracing._propagate(headers=headers)
    assert "traceparent" not in headers


def test_a_job_is_one_trace_and_finalize_links_every_image(
    services: Services, exported: InMemorySpanExporter
) -> None:
    job_id = str(uuid.uuid4())
    images = [spec(job_id, "scene", "street", 1), spec(job_id, "character", "hero", 2)]
    chord_headers: dict[str, Any] = {}

    # start continues the upstream's traceparent and hands its span to the chord's messages.
    run_task(
        c.TASK_START,
        {"id": "start-task", "traceparent": TRACEPARENT},
        [job_id],
        body=lambda: task_tracing._propagate(headers=chord_headers),
    )
    for image in images:
        run_task(
            c.TASK_GENERATE,
            {"id": f"{job_id}:{image.key}", "retries": 0, **chord_headers},
            [image.model_dump(mode="json")],
            body=lambda image=image: ImagePipeline(services).run(image, attempt=0),
        )
    run_task(c.TASK_FINALIZE, {"id": job_id}, [[], job_id])

    spans = exported.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert {s.context.trace_id for s in spans} == {int(UPSTREAM_TRACE, 16)}, "one trace"

    (start,) = by_name["refgen.start"]
    assert start.parent is not None and start.parent.span_id == int(UPSTREAM_SPAN, 16)
    assert start.attributes is not None and start.attributes["refgen.job_id"] == job_id

    image_spans = by_name["refgen.image"]
    assert len(image_spans) == 2
    assert all(s.parent and s.parent.span_id == start.context.span_id for s in image_spans)
    assert {s.attributes["refgen.image_key"] for s in image_spans if s.attributes} == {
        "scene_street",
        "character_hero",
    }
    # Each image's stages are children of its own span, in the order they ran.
    for image_span in image_spans:
        stages = sorted(
            (s for s in spans if s.parent and s.parent.span_id == image_span.context.span_id),
            key=lambda s: s.start_time or 0,
        )
        names = [s.name for s in stages]
        assert names == [
            "refgen.prepare",
            "refgen.generate",
            "refgen.ledger",
            "refgen.upload",
            "refgen.record",
        ]

    (final,) = by_name["refgen.finalize"]
    assert final.parent is not None and final.parent.span_id == start.context.span_id
    linked = {link.context.span_id for link in final.links}
    assert linked == {s.context.span_id for s in image_spans}, "the fan-in: every image"

    for span in spans:
        for value in (span.attributes or {}).values():
            assert PROMPT not in str(value)


def test_a_failed_image_span_says_so_by_type_only(
    services: Services, exported: InMemorySpanExporter
) -> None:
    job_id = str(uuid.uuid4())
    image = spec(job_id, "scene", "street", 1)
    task = SimpleNamespace(name=c.TASK_GENERATE, request=SimpleNamespace(id="i", retries=1))
    task_tracing._open_span(task_id="i", task=task, args=(image.model_dump(mode="json"),))
    task_tracing._mark_failed(task_id="i", exception=RuntimeError(PROMPT))
    task_tracing._close_span(task_id="i", state="FAILURE")
    (span,) = exported.get_finished_spans()
    assert span.status.description == "RuntimeError"
    assert span.attributes is not None and span.attributes["refgen.attempt"] == 2
    # No job span in Redis (start never ran here): the image is a root of its own trace,
    # still recorded for finalize to link.
    assert services.client.hexists(c.JobKeys(job_id).trace, tracing.image_field(image.key, 1))


def test_an_unreadable_header_or_job_id_starts_no_trace_key(
    services: Services, exported: InMemorySpanExporter
) -> None:
    run_task(c.TASK_START, {"id": "s", "traceparent": "00-garbage"}, ["not a valid id!"])
    (span,) = exported.get_finished_spans()
    assert span.parent is None
    assert not list(services.client.scan_iter(match="refgen:job:{not a valid id!}*"))
