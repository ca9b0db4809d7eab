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
    """What a provider charged for one paid call; ``ref`` names the call (a prediction id), so
    that a call resumed or reported twice is charged once."""

    ref: str
    cost: Decimal


@dataclass(frozen=True)
class PredictionRef:
    """A remote prediction in flight: enough to resume it after a redelivery."""

    id: str
    created_at: float


class PredictionCheckpoints(Protocol):
    def saved_prediction(self, job_id: str, image_key: str) -> PredictionRef | None: ...

    def save_prediction(self, job_id: str, image_key: str, ref: PredictionRef) -> None: ...


class ImageGenerator(Protocol):
    """Makes one 1024×1024 PNG. Raises ``RetryableError`` or ``PermanentError`` only; an
    error raised after the provider billed for the attempt carries its ``billed``."""

    def generate(self, request: GenerationRequest) -> GeneratedImage: ...

    def cancel_in_flight(self, job_id: str, requests: Sequence[GenerationRequest]) -> list[str]:
        """Cancel whatever of these images is still running at the provider (a job that can
        no longer pass stops paying); returns what was cancelled."""
        ...
