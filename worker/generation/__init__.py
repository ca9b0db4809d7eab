"""Image generation: the ``ImageGenerator`` protocol and what passes through it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol


@dataclass(frozen=True)
class GenerationRequest:
    job_id: str
    image_id: str
    image_key: str
    prompt: str
    negative_prompt: str
    seed: int
    palette: list[str] = field(default_factory=list)
    attempt: int = 0
    # The time left in this attempt: the generator's deadline, and the provider's.
    deadline_s: float = 120.0


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    cost: Decimal
    generation_time: float
    # True when the provider gave no billable time and the flat fallback price was used.
    cost_is_fallback: bool = False
    prediction_id: str | None = None


@dataclass(frozen=True)
class Bill:
    """What the provider charged for one paid call; ``ref`` names it (a prediction id), so a
    ledger keyed by it charges each call once however often it is reported."""

    ref: str
    cost: Decimal


@dataclass(frozen=True)
class PredictionCheckpoint:
    """One attempt at one image on a remote service: the intent to create a prediction,
    written just before the create, and the prediction's id once it is known."""

    image_key: str
    attempt: int
    intent_at: float  # unix seconds on the Redis server's clock
    age_s: float  # seconds since the intent, on the same clock, when it was read
    prediction_id: str | None = None


class PredictionCheckpoints(Protocol):
    def load(self, job_id: str) -> list[PredictionCheckpoint]:
        """Every checkpoint of the job, every image and attempt."""
        ...

    def save_intent(self, job_id: str, image_key: str, attempt: int) -> PredictionCheckpoint | None:
        """Note that a create is about to leave. None when the job's predictions have been
        cancelled: then nothing may be created for it."""
        ...

    def save_prediction(
        self, job_id: str, image_key: str, attempt: int, prediction_id: str
    ) -> None: ...

    def drop_intent(self, job_id: str, image_key: str, attempt: int) -> None:
        """The create was refused (nothing made): forget its intent."""
        ...

    def mark_cancelled(self, job_id: str) -> None: ...


class ImageGenerator(Protocol):
    """Makes one 1024×1024 PNG. Raises ``RetryableError`` or ``PermanentError`` only; an error
    raised after a paid call ran carries its ``billed``."""

    def generate(self, request: GenerationRequest) -> GeneratedImage: ...

    def cancel_in_flight(self, job_id: str, requests: Sequence[GenerationRequest]) -> list[str]:
        """Stop paying for a job: cancel every prediction of these images still running, and
        create none for the job from now on. Returns the ids cancelled."""
        ...

    def sweep_lost(
        self, job_id: str, requests: Sequence[GenerationRequest]
    ) -> list[tuple[str, Bill]]:
        """At the job's end: paid calls whose answer was lost and that no attempt took over,
        stopped, with their bills as (image key, bill), for the ledger."""
        ...

    def warm(self, connections: int) -> None:
        """At the worker's start: open what ``connections`` images at once would otherwise
        open on the first job (connections to the image service). Best effort, never paid."""
        ...
