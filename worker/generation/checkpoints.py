"""Prediction checkpoints in Redis: what makes "one prediction per image attempt" hold across
a crash.

Before each create the generator writes an *intent* (the image, the attempt, the time on the
Redis server's clock); once the create answers, the prediction's id. A delivery that finds an
id resumes that prediction; one that finds only an intent knows a create may have left (the
worker died while its sync create was held open) and looks for the prediction on Replicate
before paying for another. A job whose predictions were cancelled refuses new intents, in the
same script that would write one, so no create can slip past the cancellation.

One hash per job (``JobKeys.predictions``): ``{image_key}#{attempt}:intent`` → unix seconds,
``{image_key}#{attempt}:id`` → prediction id, ``#cancelled`` → 1. It expires with the job.
"""

from __future__ import annotations

import redis
from redis.client import Pipeline

from worker import constants as c
from worker.generation import PredictionCheckpoint
from worker.replication import Replication
from worker.scripts import register

_CANCELLED = "#cancelled"


class RedisPredictionCheckpoints:
    """Takes a ready-made Redis client (``decode_responses=True``)."""

    def __init__(
        self,
        client: redis.Redis,
        ttl_s: int = c.JOB_STATE_TTL_S,
        replication: Replication | None = None,
    ) -> None:
        self._redis = client
        self._ttl = ttl_s
        # An intent lost in a failover would let a retry pay for a second prediction.
        self._replication = replication or Replication(client)
        self._save_intent = register(client, "checkpoint_intent")

    def load(self, job_id: str) -> list[PredictionCheckpoint]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(c.JobKeys(job_id).predictions)
        (seconds, micros), fields = pipe.execute()
        now = seconds + micros / 1_000_000
        found: dict[str, dict[str, str]] = {}
        for name, value in fields.items():
            attempt_of_image, _, part = str(name).rpartition(":")
            if attempt_of_image:
                found.setdefault(attempt_of_image, {})[part] = str(value)
        checkpoints = []
        for attempt_of_image, parts in found.items():
            image_key, _, attempt = attempt_of_image.rpartition("#")
            if "intent" not in parts or not attempt.isdigit():
                continue
            intent_at = float(parts["intent"])
            checkpoints.append(
                PredictionCheckpoint(
                    image_key=image_key,
                    attempt=int(attempt),
                    intent_at=intent_at,
                    age_s=max(0.0, now - intent_at),
                    prediction_id=parts.get("id"),
                )
            )
        return sorted(checkpoints, key=lambda cp: (cp.image_key, cp.attempt))

    def save_intent(self, job_id: str, image_key: str, attempt: int) -> PredictionCheckpoint | None:
        (at,) = self._replication.write(
            "prediction_intent",
            lambda pipe: self._save_intent(
                keys=[c.JobKeys(job_id).predictions],
                args=[f"{image_key}#{attempt}", self._ttl],
                client=pipe,
            ),
        )
        if not at:
            return None
        return PredictionCheckpoint(image_key, attempt, intent_at=float(at), age_s=0.0)

    def save_prediction(
        self, job_id: str, image_key: str, attempt: int, prediction_id: str
    ) -> None:
        key = c.JobKeys(job_id).predictions

        def save(pipe: Pipeline) -> None:
            pipe.hset(key, f"{image_key}#{attempt}:id", prediction_id)
            pipe.expire(key, self._ttl)

        self._replication.write("prediction_id", save)

    def drop_intent(self, job_id: str, image_key: str, attempt: int) -> None:
        """Replicate answered the create with a refusal: nothing was made, so there is
        nothing for a later attempt to look for."""
        key = c.JobKeys(job_id).predictions
        self._redis.hdel(key, f"{image_key}#{attempt}:intent")

    def mark_cancelled(self, job_id: str) -> None:
        key = c.JobKeys(job_id).predictions

        def cancel(pipe: Pipeline) -> None:
            pipe.hset(key, _CANCELLED, "1")
            pipe.expire(key, self._ttl)

        # Lost in a failover, it would let a later delivery pay for a cancelled job's image.
        self._replication.write("predictions_cancelled", cancel)
