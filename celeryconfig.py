"""Celery configuration, from the one ``Settings`` object.

Each value here is a decision; README's Reliability section says why for the important ones.
"""

from __future__ import annotations

from datetime import timedelta

from worker import constants as c
from worker.settings import get_settings

_settings = get_settings()
# One Redis URL, or Sentinel (README: Redis failover). kombu's Redis transport, with a worker
# that survives Redis going away (tasks/transport.py); Celery's Redis backend minus its pub/sub
# result consumer, which in a worker kept every chord header task's result and subscribed
# channel for good (tasks/backend.py). With a rediss:// URL, broker_use_ssl and
# redis_backend_use_ssl carry its TLS options.
_redis = _settings.redis_endpoint().celery_config()
broker_url = _redis.pop("broker_url")
broker_transport = _redis.pop("broker_transport")
result_backend = _redis.pop("result_backend")
result_backend_transport_options = _redis.pop("result_backend_transport_options")
_sentinel_options = _redis.pop("broker_transport_options")
broker_use_ssl = _redis.get("broker_use_ssl", False)
redis_backend_use_ssl = _redis.get("redis_backend_use_ssl", False)

# JSON only: a broker that accepts pickle runs code for anyone who can write to it.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# A task is acked when it ends, not when it starts, and comes back if its process dies.
task_acks_late = True
task_reject_on_worker_lost = True
# One message per slot: a slow image never holds a second one hostage.
worker_prefetch_multiplier = 1
# Longer than the longest delivery (120 s image deadline, the upload's three attempts and a
# Retry-After wait), so a slow image is never handed to a second worker while it runs.
# One list per priority level 0–9 (worker/fairness.py), where kombu's default keeps four and
# folds the others into them; a client with the default steps still lands in one of these.
broker_transport_options = {
    "visibility_timeout": 600,
    "priority_steps": list(c.PRIORITY_LEVELS),
    **_sentinel_options,
}
broker_connection_retry_on_startup = True
broker_connection_max_retries = None  # reconnect for as long as it takes
# Result writes (chord counts among them) ride out a Redis restart instead of failing a task.
result_backend_always_retry = True
result_backend_max_retries = 30
redis_backend_health_check_interval = 30
# A running task keeps going when the broker blips: its result and events still land, and
# its lease covers it if its ack is lost.
worker_cancel_long_running_tasks_on_connection_loss = False

# For Flower: the worker's task events (received, started, succeeded, failed, retried).
# Not task_track_started or task_send_sent_event: each costs a Redis write per task on the
# critical path (measured: bench/latency.py), and Flower has the same facts from the events.
worker_send_task_events = True

# Results must expire (a week by default, JOB_STATE_TTL_S: enough to read one by job id) but
# never with 0, which hangs chords on the Redis backend.
result_expires = timedelta(seconds=_settings.job_state_ttl_s)

# Retention (SPEC §5): hourly, so an object outlives its due time by an hour at most.
beat_schedule = {
    "purge-expired-references": {"task": c.TASK_PURGE, "schedule": timedelta(hours=1)},
}

# One result backend for the whole process, not one per pool thread: each thread's own was
# built, with its own Redis connections, on the first task that thread ran (issue 23: the first
# job after a start paid for four). The Redis client under it is thread-safe.
result_backend_thread_safe = True

task_default_queue = c.DEFAULT_QUEUE
worker_concurrency = _settings.reference_gen_concurrency
worker_pool = _settings.reference_gen_pool
# Our structlog lines go through the same handlers; Celery keeps ownership of the root logger.
worker_hijack_root_logger = True
worker_redirect_stdouts = False
