"""What the first job after a worker starts would otherwise pay, paid at start instead.

The first job on a fresh worker took longer than the next ones (issue 23: about 150 ms; the
spans of ``bench/latency.py`` put it in the first images' start): Redis connections opened one
by one as the slots first need them, every Lua script sent in full on its first call (a
``NOSCRIPT`` and a second round trip), Pillow's PNG plugin and zlib loaded on the first image,
the models' first serialisation. None of it needs a job: done here, as the worker starts.

Celery-free; ``tasks/warmup.py`` calls it from the worker's start-up signals.
"""

from __future__ import annotations

import io
import time
from decimal import Decimal

import redis
import structlog
from PIL import Image
from redis.lock import Lock

from worker import scripts
from worker.events import ImageCompleted, Progress, encode
from worker.models import ImageOutcome
from worker.services import Services

log = structlog.get_logger(__name__)


def warm(services: Services, connections: int) -> float:
    """Warm this process for ``connections`` tasks at once. Returns the seconds it took.
    Best effort: a failure is logged and the worker starts all the same (the first job then
    pays what is left, as before)."""
    started = time.perf_counter()
    for step in (_redis, _scripts, _generator, _pillow, _models):
        try:
            step(services, connections)
        except Exception as exc:
            log.warning("warmup_step_failed", step=step.__name__.strip("_"), error=repr(exc))
    took = time.perf_counter() - started
    log.info("worker_warmed", took_ms=round(took * 1000, 1), connections=connections)
    return took


def _redis(services: Services, connections: int) -> None:
    # As many connections as tasks that can run at once, plus the lease keeper's and one for
    # the events, open before the first of them is needed.
    open_connections(services.client, connections + 2)


def open_connections(client: redis.Redis, count: int) -> None:
    """Leave ``count`` connections open in ``client``'s pool, ready for threads at once."""
    pool = client.connection_pool
    held = [pool.get_connection() for _ in range(count)]
    try:
        for connection in held:
            connection.connect()  # type: ignore[no-untyped-call]
    finally:
        for connection in held:
            pool.release(connection)


def _scripts(services: Services, _: int) -> None:
    # In the server's script cache, so the first EVALSHA of each is answered, not refused:
    # ours, and the release and renewal of redis-py's image locks (an image's lock is released
    # between its outcome and the job's end: a refused release was two round trips more on
    # the first job's path).
    pipe = services.client.pipeline(transaction=False)
    for name in scripts.NAMES:
        pipe.script_load(scripts.source(name))
    for source in (Lock.LUA_RELEASE_SCRIPT, Lock.LUA_REACQUIRE_SCRIPT):
        pipe.script_load(source)
    pipe.execute()


def _generator(services: Services, connections: int) -> None:
    # A connection to Replicate for each task at once: over TLS, each is a handshake of
    # several round trips that the first job's images would otherwise make as they create.
    services.generator.warm(connections)


def _pillow(_: Services, __: int) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", compress_level=1)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        image.load()


def _models(_: Services, __: int) -> None:
    outcome = ImageOutcome(
        image_type="scene",
        image_id="warmup",
        ok=True,
        prompt_used="",
        image_url="http://localhost/warmup.png",
        generation_time=0.0,
        cost=Decimal(0),
        retry_count=0,
    )
    ImageOutcome.model_validate(outcome.model_dump(mode="json"))
    encode(
        ImageCompleted(
            image_type="scene",
            image_id="warmup",
            image_url="http://localhost/warmup.png",
            generation_time=0.0,
            cost=Decimal(0),
            retry_count=0,
            completed_images=0,
            total_images=1,
        )
    )
    encode(Progress(progress=0))
