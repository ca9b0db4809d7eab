"""From an upstream payload to the list of images a job makes (SPEC §2)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from pydantic import ValidationError

from worker import constants as c
from worker.errors import InvalidPlanError
from worker.models import ImageSpec, ScenePlan
from worker.prompts import character_prompt, scene_prompt

# A larger error list helps nobody: the first few say what to fix.
_MAX_DETAILS = 5


@dataclass(frozen=True)
class JobPlan:
    job_id: str
    images: list[ImageSpec]
    budget_limit: Decimal | None

    @property
    def scene_count(self) -> int:
        return sum(1 for i in self.images if i.image_type == "scene")

    @property
    def character_count(self) -> int:
        return len(self.images) - self.scene_count


def parse_plan(raw: object) -> ScenePlan:
    """Validate an upstream payload (a dict, or JSON text) into a ``ScenePlan``."""
    try:
        if isinstance(raw, str | bytes):
            return ScenePlan.model_validate_json(raw)
        return ScenePlan.model_validate(raw)
    except ValidationError as exc:
        details = [_describe(err) for err in exc.errors(include_url=False)[:_MAX_DETAILS]]
        raise InvalidPlanError(
            f"The scene plan is invalid: {details[0]}", details=details
        ) from None


def _describe(err: object) -> str:
    assert isinstance(err, dict)
    location = ".".join(str(part) for part in err.get("loc", ())) or "plan"
    return f"{location}: {err.get('msg', 'invalid')}"


def budget_limit(duration_seconds: object, per_minute: Decimal) -> Decimal | None:
    """``duration / 60 × $200``; no duration, no limit (SPEC §6)."""
    if duration_seconds is None:
        return None
    if isinstance(duration_seconds, bool) or not isinstance(duration_seconds, int | float | str):
        raise InvalidPlanError("duration_seconds must be a number of seconds")
    try:
        duration = Decimal(str(duration_seconds))
    except InvalidOperation:
        raise InvalidPlanError("duration_seconds must be a number of seconds") from None
    if not duration.is_finite() or duration < 0:
        raise InvalidPlanError("duration_seconds must be a finite number, zero or more")
    return duration / 60 * per_minute


def plan_job(
    job_id: str,
    raw_plan: object,
    duration_seconds: object,
    *,
    max_images: int,
    per_minute: Decimal,
) -> JobPlan:
    """Validate, dedupe and expand a plan into one ``ImageSpec`` per scene and character.

    Raises ``InvalidPlanError`` with a sentence a person can act on."""
    plan = parse_plan(raw_plan)
    if str(plan.job_id) != str(job_id):
        raise InvalidPlanError(
            f"job_id {job_id!r} does not match the plan's job_id {str(plan.job_id)!r}"
        )
    limit = budget_limit(duration_seconds, per_minute)
    scenes, characters = plan.unique_scenes(), plan.unique_characters()
    if not scenes or not characters:
        raise InvalidPlanError(
            "The scene plan needs at least one scene and one character; "
            f"it has {len(scenes)} scene(s) and {len(characters)} character(s)"
        )
    total = len(scenes) + len(characters)
    if total > max_images:
        raise InvalidPlanError(
            f"The scene plan asks for {total} images; at most {max_images} are allowed per job"
        )
    prompts = [("scene", s.id, scene_prompt(s, plan.style)) for s in scenes] + [
        ("character", ch.id, character_prompt(ch, plan.style)) for ch in characters
    ]
    images = [
        ImageSpec(
            job_id=str(job_id),
            image_type=kind,
            image_id=image_id,
            prompt=prompt,
            negative_prompt=c.NEGATIVE_PROMPT,
            palette=plan.style.color_palette,
            seed=secrets.randbelow(2**32),
            index=index,
            total=total,
        )
        for index, (kind, image_id, prompt) in enumerate(prompts, start=1)
    ]
    return JobPlan(job_id=str(job_id), images=images, budget_limit=limit)


def estimate_cost(image_count: int) -> Decimal:
    """Pre-flight estimate: ``images × $0.005 × 1.2`` (SPEC §6)."""
    return image_count * c.FALLBACK_IMAGE_COST * c.ESTIMATE_SAFETY_FACTOR
