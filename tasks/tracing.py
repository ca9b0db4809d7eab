"""Celery's side of a job's trace (worker/tracing.py): a span per task, from its signals.

Opened in ``task_prerun`` and closed in ``task_postrun``, in the process that runs the task;
the provider is built in ``worker_process_init`` (prefork: each child its own export thread)
or ``worker_init`` (threads, solo). ``start`` continues the ``traceparent`` header its sender
put on the message; an image continues the one ``start`` put on the chord's messages (or, for
a message re-sent without it, the job's span from Redis); ``finalize`` is a child of ``start``
linked to every image span. A fault in tracing is logged and never fails a task.
"""

from __future__ import annotations

import re
import threading
from contextvars import Token
from typing import Any

import structlog
from celery.signals import (
    before_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanContext, SpanKind

from tasks.app import services
from worker import constants as c
from worker import tracing
from worker.settings import get_settings

log = structlog.get_logger(__name__)

_JOB_ID = re.compile(c.ID_PATTERN)
# Open spans by task id: a thread pool runs several tasks in one process at once.
_open: dict[str, tuple[Span, Token[otel_context.Context]]] = {}
_lock = threading.Lock()


@worker_process_init.connect
def _init_in_child(**_: Any) -> None:
    tracing.init()


@worker_init.connect
def _init_in_worker(**_: Any) -> None:
    # A prefork parent runs no task: its children build their own provider after the fork.
    if get_settings().reference_gen_pool != "prefork":
        tracing.init()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush(**_: Any) -> None:
    tracing.shutdown()


@before_task_publish.connect
def _propagate(headers: dict[str, Any] | None = None, **_: Any) -> None:
    # The chord's messages, sent from inside start's span, carry it to the images.
    if headers is None or not tracing.enabled():
        return
    current = trace.get_current_span().get_span_context()
    if current.is_valid:
        headers["traceparent"] = tracing.encode(current)


@task_prerun.connect
def _open_span(
    task_id: str | None = None,
    task: Any = None,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    if not tracing.enabled() or task_id is None or task is None:
        return
    try:
        opened = _task_span(task, list(args or ()), kwargs or {})
    except Exception as exc:
        log.warning("trace_span_not_opened", task=getattr(task, "name", "?"), error=repr(exc))
        return
    if opened is not None:
        token = otel_context.attach(trace.set_span_in_context(opened))
        with _lock:
            _open[task_id] = (opened, token)


@task_failure.connect
def _mark_failed(
    task_id: str | None = None, exception: BaseException | None = None, **_: Any
) -> None:
    with _lock:
        entry = _open.get(task_id or "")
    if entry is not None and exception is not None:
        tracing.failed(entry[0], exception)


@task_postrun.connect
def _close_span(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    with _lock:
        entry = _open.pop(task_id or "", None)
    if entry is None:
        return
    opened, token = entry
    if state:
        opened.set_attribute("celery.state", state)
    opened.end()
    otel_context.detach(token)  # logs, never raises, if the context moved on meanwhile


def _task_span(task: Any, args: list[Any], kwargs: dict[str, Any]) -> Span | None:
    name = task.name
    request = task.request
    if name == c.TASK_START:
        return _start_span(request, kwargs.get("job_id", args[0] if args else None))
    if name == c.TASK_GENERATE:
        spec = kwargs.get("spec", args[0] if args else None)
        return _image_span(request, spec if isinstance(spec, dict) else {})
    if name == c.TASK_FINALIZE:
        return _finalize_span(request, kwargs.get("job_id", args[1] if len(args) > 1 else None))
    return None


def _header(request: Any) -> SpanContext | None:
    # Custom message headers are the request's attributes (Celery protocol 2); older clients
    # nest them under "headers".
    value = getattr(request, "traceparent", None)
    if value is None and isinstance(getattr(request, "headers", None), dict):
        value = request.headers.get("traceparent")
    return tracing.decode(value)


def _job_id(value: object) -> str | None:
    return value if isinstance(value, str) and _JOB_ID.match(value) else None


def _job_trace() -> tracing.JobTrace:
    built = services()
    return tracing.JobTrace(built.client, built.settings.job_state_ttl_s)


def _parented(context: SpanContext | None) -> otel_context.Context | None:
    return trace.set_span_in_context(trace.NonRecordingSpan(context)) if context else None


def _start_span(request: Any, job_id: object) -> Span:
    job = _job_id(job_id)
    opened = tracing.tracer().start_span(
        "refgen.start",
        context=_parented(_header(request)),
        kind=SpanKind.CONSUMER,
        attributes=tracing.clean({"job_id": job, "task_id": request.id}),
    )
    if job is not None:
        _job_trace().remember(job, tracing.JOB_FIELD, opened.get_span_context())
    return opened


def _image_span(request: Any, spec: dict[str, Any]) -> Span | None:
    job = _job_id(spec.get("job_id"))
    if job is None:
        return None
    key = f"{spec.get('image_type')}_{spec.get('image_id')}"
    attempt = int(getattr(request, "retries", 0) or 0)
    parent = _header(request) or _job_trace().job(job)
    opened = tracing.tracer().start_span(
        "refgen.image",
        context=_parented(parent),
        kind=SpanKind.CONSUMER,
        attributes=tracing.clean(
            {
                "job_id": job,
                "image_key": key,
                "image_type": spec.get("image_type"),
                "attempt": attempt + 1,
                "task_id": request.id,
            }
        ),
    )
    # Before the image's work, so that it is there when the chord's finalize reads it.
    _job_trace().remember(job, tracing.image_field(key, attempt), opened.get_span_context())
    return opened


def _finalize_span(request: Any, job_id: object) -> Span | None:
    job = _job_id(job_id)
    if job is None:
        return None
    parent, images = _job_trace().everything(job)
    return tracing.tracer().start_span(
        "refgen.finalize",
        context=_parented(parent),
        kind=SpanKind.CONSUMER,
        links=tracing.links(images),
        attributes=tracing.clean({"job_id": job, "images_linked": len(images)}),
    )
