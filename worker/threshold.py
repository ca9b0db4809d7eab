"""The partial-success rule (SPEC §8) and the result it yields."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from worker import constants as c
from worker.models import ImageOutcome, ReferenceImage, ReferenceImages, ReferenceMetadata

Status = Literal["success", "partial"]


def decide_status(outcomes: list[ImageOutcome], total_images: int) -> Status | None:
    """``success`` when every image was made; ``partial`` with at least half of them and at
    least one scene and one character; otherwise ``None``: the pipeline goes text-only."""
    made = [o for o in outcomes if o.ok]
    if total_images > 0 and len(made) == total_images:
        return "success"
    has_scene = any(o.image_type == "scene" for o in made)
    has_character = any(o.image_type == "character" for o in made)
    if has_scene and has_character and Decimal(len(made)) >= c.MIN_SUCCESS_RATIO * total_images:
        return "partial"
    return None


def build_result(
    *,
    job_id: str,
    outcomes: list[ImageOutcome],
    total_images: int,
    total_cost: Decimal,
    model_version: str,
    environment: str,
) -> ReferenceImages | None:
    status = decide_status(outcomes, total_images)
    if status is None:
        return None
    made = [o for o in outcomes if o.ok and o.image_url]
    scenes = [_reference(o) for o in made if o.image_type == "scene"]
    characters = [_reference(o) for o in made if o.image_type == "character"]
    return ReferenceImages(
        job_id=job_id,
        scene_references=scenes,
        character_references=characters,
        total_references=len(made),
        total_generation_time=round(sum(o.generation_time for o in made), 3),
        total_cost=total_cost,
        status=status,
        metadata=ReferenceMetadata(
            scenes_generated=len(scenes),
            characters_generated=len(characters),
            model_version=model_version,
            environment=environment,
        ),
    )


def _reference(outcome: ImageOutcome) -> ReferenceImage:
    assert outcome.image_url is not None
    is_scene = outcome.image_type == "scene"
    return ReferenceImage(
        scene_id=outcome.image_id if is_scene else None,
        character_id=None if is_scene else outcome.image_id,
        image_url=outcome.image_url,
        prompt_used=outcome.prompt_used,
        generation_time=outcome.generation_time,
        cost=outcome.cost,
    )
