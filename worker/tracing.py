"""A trace per job (OpenTelemetry), off unless the standard ``OTEL_*`` variables ask for one.

The upstream stage's ``traceparent`` (a message header) is the parent of ``start``; each image
attempt is a child of ``start`` with its stages (admission, create and wait, download, upload,
ledger, record) as children of its own; ``finalize`` is a child of ``start`` too and carries a
link to every image span: the fan-in. Images and ``finalize`` run in other processes, after
``start`` has ended, so the job's span contexts travel in one per-job Redis hash
(``JobKeys.trace``), written only while tracing is on.

Attributes carry ids (job, image, attempt, prediction), never prompts, URLs or credentials.
Celery-free: ``tasks/tracing.py`` opens and closes the task spans from Celery's signals.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from worker import constants as c

TRACER_NAME = "refgen"
DEFAULT_SERVICE_NAME = "refgen-worker"
# Hash fields of JobKeys.trace: the job's (start's) span, and one per image attempt.
JOB_FIELD = "job"
IMAGE_FIELD_PREFIX = "image:"

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Tracing is on when an OTLP endpoint or a traces exporter is named, and the SDK is not
    disabled (the standard variables; nothing of ours)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return bool(exporter or endpoint)


def init(env: Mapping[str, str] = os.environ) -> bool:
    """Install this process's tracer provider when tracing is wanted. Called once per process
    (a forked child calls it again: the parent's export thread does not survive the fork).
    Returns whether tracing is on."""
    if not wanted(env):
        return False
    exporters = {e.strip() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    processors: list[SpanProcessor] = []
    if "otlp" in exporters or not exporters - {""}:
        # Imported only when used: it brings protobuf and requests along.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*.
        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in exporters:
        processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
    install(TracerProvider(resource=_resource(env)), processors)
    return True


def _resource(env: Mapping[str, str]) -> Resource:
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; ours is the default.
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if named else {"service.name": DEFAULT_SERVICE_NAME})


def install(provider: TracerProvider, processors: Sequence[SpanProcessor] = ()) -> None:
    """Use ``provider`` for this process's spans (tests hand in one with an in-memory
    exporter). Replaces an earlier one, unlike the global that the API sets only once."""
    global _provider
    for processor in processors:
        provider.add_span_processor(processor)
    _provider = provider


def shutdown() -> None:
    """Send what is still buffered; called as a worker process ends."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    if _provider is None:
        return trace.NoOpTracer()
    return _provider.get_tracer(TRACER_NAME)


@contextmanager
def span(name: str, **attributes: str | int | float | bool | None) -> Iterator[Span]:
    """A child of the current span (a stage of an image); costs nothing while tracing is off.
    An exception marks it as an error, by type only: messages may quote what a user sent."""
    if _provider is None:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        name, attributes=clean(attributes), record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, exc)
            raise


def clean(attributes: Mapping[str, object]) -> dict[str, Any]:
    """``refgen.``-prefixed attributes, the unset ones left out."""
    return {f"refgen.{k}": v for k, v in attributes.items() if v is not None}


def failed(current: Span, exc: BaseException) -> None:
    current.set_status(Status(StatusCode.ERROR, type(exc).__name__))
    current.set_attribute("error.type", type(exc).__name__)


# ---------------------------------------------------------------------------- propagation
def encode(context: SpanContext) -> str:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(trace.NonRecordingSpan(context)))
    return carrier.get("traceparent", "")


def decode(traceparent: object) -> SpanContext | None:
    if not isinstance(traceparent, str) or not traceparent:
        return None
    context = trace.get_current_span(_propagator.extract({"traceparent": traceparent}))
    span_context = context.get_span_context()
    return span_context if span_context.is_valid else None


class JobTrace:
    """The per-job hash of span contexts that joins a job's spans across processes."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client
        self._ttl_s = ttl_s

    def remember(self, job_id: str, field: str, context: SpanContext) -> None:
        key = c.JobKeys(job_id).trace
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, field, encode(context))
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def job(self, job_id: str) -> SpanContext | None:
        return decode(self._redis.hget(c.JobKeys(job_id).trace, JOB_FIELD))

    def everything(self, job_id: str) -> tuple[SpanContext | None, list[SpanContext]]:
        """The job's span and every image span, in a stable order."""
        stored: dict[str, str] = self._redis.hgetall(c.JobKeys(job_id).trace)  # type: ignore[assignment]
        images = [
            decoded
            for field in sorted(stored)
            if field.startswith(IMAGE_FIELD_PREFIX)
            and (decoded := decode(stored[field])) is not None
        ]
        return decode(stored.get(JOB_FIELD)), images


def image_field(image_key: str, attempt: int) -> str:
    return f"{IMAGE_FIELD_PREFIX}{image_key}:{attempt}"


def links(contexts: Sequence[SpanContext]) -> list[Link]:
    return [Link(context, {"refgen.link": "image"}) for context in contexts]
