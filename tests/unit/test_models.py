from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from worker.errors import InvalidPlanError
from worker.models import ReferenceImages, ScenePlan
from worker.planning import budget_limit, estimate_cost, parse_plan, plan_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plans"
SAMPLES = sorted(p.stem for p in EXAMPLES.glob("*.json"))


def _plan(raw: dict, duration: object = None, max_images: int = 50):
    return plan_job(
        raw.get("job_id"), raw, duration, max_images=max_images, per_minute=Decimal(200)
    )


def test_the_project_has_its_own_sample_plans() -> None:
    assert {"typical_2x2", "minimal_1x1", "repeated_scene", "large_5x3"} <= set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_plans_load(name: str) -> None:
    raw = json.loads((EXAMPLES / f"{name}.json").read_text())
    plan = ScenePlan.model_validate(raw)
    assert plan.unique_scenes() and plan.unique_characters()
    assert _plan(raw).images  # and they pass every rule of a job, not only the schema


def test_repeated_scene_is_deduped_first_wins() -> None:
    raw = json.loads((EXAMPLES / "repeated_scene.json").read_text())
    job = _plan(raw)
    assert [i.key for i in job.images] == [
        "scene_city_street",
        "scene_rooftop",
        "character_protagonist",
        "character_antagonist",
    ]
    assert "(repeat appearance)" not in job.images[0].prompt
    assert [i.index for i in job.images] == [1, 2, 3, 4]
    assert {i.total for i in job.images} == {4}


def test_unknown_fields_are_accepted() -> None:
    raw = json.loads((EXAMPLES / "minimal_1x1.json").read_text())
    raw["new_planner_field"] = {"anything": 1}
    raw["scenes"][0]["camera"] = "drone"
    assert len(_plan(raw).images) == 2


def test_invalid_sample_is_refused_with_readable_details() -> None:
    raw = json.loads((EXAMPLES.parent.parent / "tests" / "data" / "invalid_plan.json").read_text())
    with pytest.raises(InvalidPlanError) as info:
        parse_plan(raw)
    text = " | ".join(info.value.details)
    assert "job_id" in text and "scenes.0.id" in text
    assert "Traceback" not in info.value.reason


@pytest.mark.parametrize("bad_id", ["../etc", "a/b", "a b", "", "x" * 65, "é", "a\x00b"])
def test_ids_outside_the_safe_alphabet_are_invalid(bad_id: str) -> None:
    raw = json.loads((EXAMPLES / "minimal_1x1.json").read_text())
    raw["scenes"][0]["id"] = bad_id
    with pytest.raises(InvalidPlanError):
        _plan(raw)


def test_needs_a_scene_and_a_character() -> None:
    raw = json.loads((EXAMPLES / "minimal_1x1.json").read_text())
    raw["characters"] = []
    with pytest.raises(InvalidPlanError, match="at least one scene and one character"):
        _plan(raw)


def test_image_cap_counts_after_dedupe() -> None:
    raw = json.loads((EXAMPLES / "large_5x3.json").read_text())
    raw["scenes"] = raw["scenes"] + raw["scenes"]  # duplicates do not count twice
    assert len(_plan(raw, max_images=8).images) == 8
    with pytest.raises(InvalidPlanError, match="at most 7"):
        _plan(raw, max_images=7)


def test_job_id_must_match_the_plan() -> None:
    raw = json.loads((EXAMPLES / "minimal_1x1.json").read_text())
    with pytest.raises(InvalidPlanError, match="does not match"):
        plan_job(
            "00000000-0000-4000-8000-000000000000",
            raw,
            None,
            max_images=50,
            per_minute=Decimal(200),
        )


def test_budget_limit_from_duration() -> None:
    assert budget_limit(180, Decimal(200)) == Decimal(600)
    assert budget_limit(None, Decimal(200)) is None
    assert budget_limit("90", Decimal(200)) == Decimal(300)
    for bad in (-1, "abc", float("nan"), float("inf"), True, [1]):
        with pytest.raises(InvalidPlanError):
            budget_limit(bad, Decimal(200))


def test_estimate() -> None:
    assert estimate_cost(4) == Decimal("0.024")


def test_reference_images_serialise_costs_as_decimal_strings() -> None:
    result = ReferenceImages.model_validate(
        {
            "job_id": "j",
            "scene_references": [],
            "character_references": [],
            "total_references": 0,
            "total_generation_time": 0.0,
            "total_cost": Decimal("0.0006525"),
            "status": "success",
            "metadata": {
                "scenes_generated": 0,
                "characters_generated": 0,
                "model_version": "m",
                "environment": "development",
            },
        }
    )
    dumped = result.model_dump(mode="json")
    assert dumped["total_cost"] == "0.0006525"
    assert dumped["metadata"]["dimensions"] == "1024x1024"
