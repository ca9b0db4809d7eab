"""Every name, price and limit that more than one module must agree on."""

from __future__ import annotations

from decimal import Decimal
from typing import Final

STAGE: Final = "reference_generator"

# Celery task names: upstream sends ``reference_generator.start`` by name.
TASK_START: Final = f"{STAGE}.start"
TASK_GENERATE: Final = f"{STAGE}.generate_reference"
TASK_FINALIZE: Final = f"{STAGE}.finalize"
TASK_PURGE: Final = f"{STAGE}.purge_expired"
TASK_CANCEL: Final = f"{STAGE}.cancel"
DEFAULT_QUEUE: Final = STAGE

# Message priorities on the Redis broker (worker/fairness.py): 0 is served first, and kombu's
# Redis transport knows 0–9. The worker keeps one list per level and queue.
PRIORITY_TOP: Final = 0
PRIORITY_LOWEST: Final = 9
PRIORITY_LEVELS: Final = tuple(range(PRIORITY_TOP, PRIORITY_LOWEST + 1))
# kombu's Redis transport, as the backlog gauges read it without importing kombu (a test holds
# these to kombu's): level N > 0 of a queue is the list "<queue>\x06\x16<N>" (level 0 is the
# queue's own name); messages taken and not yet acknowledged are in the hash "unacked".
KOMBU_PRIORITY_SEP: Final = "\x06\x16"
# Aging (worker/fairness.py): a level whose next message has waited this long at its head
# rises a level; the hash of when each head was first seen there (server clock).
QUEUE_AGING_S: Final = 60.0
QUEUE_AGING_MOST: Final = 5000


def aging_first_seen(queue: str) -> str:
    return f"refgen:aging:first-seen:{queue}"


KOMBU_UNACKED: Final = "unacked"

# Event types relayed by the SSE gateway (SPEC §7).
EVENT_STAGE_UPDATE: Final = "stage_update"
EVENT_IMAGE_START: Final = "reference_generation_start"
EVENT_IMAGE_RETRY: Final = "reference_generation_retry"
EVENT_IMAGE_COMPLETE: Final = "reference_generation_complete"
EVENT_IMAGE_FAILED: Final = "reference_generation_failed"
EVENT_PROGRESS: Final = "progress"
EVENT_ERROR: Final = "error"
# A stage_update with one of these statuses is a job's last word (SPEC §7).
FINAL_STAGE_STATUSES: Final = ("completed", "failed", "cancelled")

# Image generation (SPEC §4).
SDXL_VERSION: Final = (
    "stability-ai/sdxl:39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
)
IMAGE_SIZE: Final = 1024
NEGATIVE_PROMPT: Final = "blurry, static, low quality, distorted, watermark, text overlay"
MAX_PROMPT_CHARS: Final = 500
IMAGE_TIMEOUT_S: Final = 120.0

# Replicate's limits (its docs, "rate limits"): creates, and every other API request.
REPLICATE_CREATES_PER_MINUTE: Final = 600
REPLICATE_REQUESTS_PER_MINUTE: Final = 3000
# Sync mode holds a create open at most this long (Replicate's maximum for Prefer: wait).
REPLICATE_MAX_WAIT_S: Final = 60
# Replicate stops any prediction after 30 minutes: a longer Cancel-After would mean nothing.
REPLICATE_MAX_RUN_S: Final = 1800

# Retry design (SPEC §1): two attempts in all, the second 2 s after the first.
GENERATION_MAX_ATTEMPTS: Final = 2
GENERATION_RETRY_DELAY_S: Final = 2.0
# A Retry-After longer than this is capped: a slot should not sit idle for minutes.
RETRY_AFTER_CAP_S: Final = 30.0
STORAGE_MAX_ATTEMPTS: Final = 3

# Money (SPEC §4, §6). Ledger amounts are kept as integer nano-dollars so that
# Redis never accumulates float error across thousands of images.
NANO_PER_DOLLAR: Final = 1_000_000_000
FALLBACK_IMAGE_COST: Final = Decimal("0.005")
DEFAULT_HARDWARE_PRICE_PER_S: Final = Decimal("0.000725")
BUDGET_PER_VIDEO_MINUTE: Final = Decimal("200")
ESTIMATE_SAFETY_FACTOR: Final = Decimal("1.2")

# Plan limits (SPEC §2).
MAX_IMAGES_PER_JOB: Final = 50
ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"

# Storage (SPEC §5).
DEFAULT_BUCKET: Final = "reference-images"
MAX_IMAGE_BYTES: Final = 5 * 1024 * 1024
SIGNED_URL_TTL_S: Final = 14 * 24 * 3600
RETENTION_SUCCESS_DAYS: Final = 14
RETENTION_FAILURE_DAYS: Final = 7

# Partial-success rule (SPEC §8).
MIN_SUCCESS_RATIO: Final = Decimal("0.5")


def events_channel(job_id: str) -> str:
    """Pub/sub channel the SSE gateway subscribes to."""
    return f"job_events:{job_id}"


def events_stream(job_id: str) -> str:
    """The job's event history (a capped Redis Stream), for replay by the SSE gateway."""
    return f"refgen:events:{{{job_id}}}"


def replicate_limit_key(kind: str) -> str:
    """The cluster-wide sliding window of one kind of Replicate request (``creates`` or
    ``requests``), and beside it the back-off a 429 sets for that kind."""
    return f"refgen:ratelimit:replicate:{kind}"


def replicate_backoff_key(kind: str) -> str:
    return f"refgen:ratelimit:replicate:{kind}:backoff"


def replicate_backoff_request_key(kind: str, request_id: str) -> str:
    """The mark of one back-off request: run again, it moves nothing."""
    return f"refgen:ratelimit:replicate:{kind}:backoff:{request_id}"


# A job's stream holds at most this many events (a 50-image job makes about 260), and goes
# this long after its last event.
EVENTS_STREAM_MAXLEN: Final = 2000
EVENTS_STREAM_TTL_S: Final = 24 * 3600

# Recent jobs, for the gateway's index page: job ids scored by when they were first seen, and
# a summary of each (status, images, cost, times). The hash tag keeps both in one cluster slot
# for the Lua script that writes them. Bounded both ways: at most this many jobs, and none
# older than its events (the page a row links to shows nothing once they are gone).
JOB_INDEX: Final = "refgen:{jobs}:recent"
JOB_INDEX_SUMMARIES: Final = "refgen:{jobs}:summaries"
JOB_INDEX_MAX_ENTRIES: Final = 500
JOB_INDEX_TTL_S: Final = EVENTS_STREAM_TTL_S


# Cluster-wide keys (README: Reliability, Scaling).
LEASES: Final = "refgen:leases"  # sorted set: task id → lease expiry (server clock)
LEASE_RECORDS: Final = "refgen:lease-records"  # hash: task id → "<token> <message JSON>"
DEADLINES: Final = "refgen:deadlines"  # sorted set: job id → due time (server clock)
# hash: delivery tag of an unacked message with no lease → when first seen so (server clock)
ORPHANS_FIRST_SEEN: Final = "refgen:orphans:first-seen"
RETENTION_INDEX: Final = "refgen:retention"  # sorted set: job id → when its objects go
METRICS: Final = "refgen:metrics"  # hash: the cluster's job counters
WORKERS_SEEN: Final = "refgen:workers"  # sorted set: worker name → last heartbeat (server clock)


# How long a publish's mark stops it being announced twice: a retried command (seconds), and
# an announcement named once (worker/events.py), which a redelivered message repeats (minutes).
PUBLISH_RETRY_MARK_TTL_S = 600
ANNOUNCED_ONCE_TTL_S = 86_400


class JobKeys:
    """Redis keys of one job. The ``{job_id}`` hash tag keeps them in one cluster slot,
    which the ledger's Lua scripts need."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        prefix = f"refgen:job:{{{job_id}}}"
        self.claim = f"{prefix}:claim"
        self.meta = f"{prefix}:meta"
        self.ledger = f"{prefix}:ledger"
        self.reservations = f"{prefix}:reservations"
        self.charges = f"{prefix}:charges"
        self.images = f"{prefix}:images"
        self.counts = f"{prefix}:counts"
        self.result = f"{prefix}:result"
        # Prediction checkpoints: per image and attempt, the intent to create and the id.
        self.predictions = f"{prefix}:predictions"
        self.made = f"{prefix}:made"
        # Span contexts of the job's trace (worker/tracing.py), written only while tracing is on.
        self.trace = f"{prefix}:trace"

    def sent(self, request_id: str) -> str:
        """The mark of one event's publish request: its retry publishes nothing again."""
        return f"refgen:job:{{{self.job_id}}}:sent:{request_id}"

    def image_lock(self, image_key: str) -> str:
        return f"refgen:job:{{{self.job_id}}}:lock:{image_key}"

    def all(self) -> list[str]:
        return [
            self.claim,
            self.meta,
            self.ledger,
            self.reservations,
            self.charges,
            self.images,
            self.counts,
            self.result,
            self.predictions,
            self.made,
            self.trace,
        ]


# Worst case for one image is two attempts of 120 s plus downloads, uploads and a capped
# Retry-After: about 6 minutes. Fifteen leave room for a queue behind the job.
JOB_DEADLINE_S: Final = 900.0
LEASE_TTL_S: Final = 20.0
# A job whose every image has an outcome is finalized by its chord within moments; its deadline
# is brought forward to this, so a lost chord count (a Redis failover) delays it this long.
SETTLED_JOB_GRACE_S: Final = 30.0

# How long a job's bookkeeping outlives it: long enough to read the result by job id.
JOB_STATE_TTL_S: Final = 7 * 24 * 3600

# The header our processes stamp on every message they publish (tasks/app.py): its send time,
# unix seconds on the sender's clock, which Celery's messages do not carry (worker/backlog.py).
SENT_AT_HEADER: Final = "refgen_sent_at"

# A job cancelled before any start claimed it is claimed by its cancel: "cancel:<request id>"
# (worker/cancel.py), so that a start arriving later knows why it may not run.
CANCEL_CLAIM_PREFIX: Final = "cancel:"


def claim_reply(request_id: str) -> str:
    """The reply of one watchdog claim (leases, deadlines), kept while its claims hold."""
    return f"refgen:claim-reply:{request_id}"
