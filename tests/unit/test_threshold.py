from __future__ import annotations

from decimal import Decimal

import pytest

from worker.models import ImageOutcome
from worker.threshold import build_result, decide_status


def outcome(kind: str, ok: bool, image_id: str | None = None) -> ImageOutcome:
    return ImageOutcome(
        image_type=kind,
        image_id=image_id or f"{kind}{id(object())}",
        ok=ok,
        prompt_used="p",
        image_url="file:///x.png" if ok else None,
        generation_time=1.5,
        cost=Decimal("0.005") if ok else Decimal(0),
    )


@pytest.mark.parametrize(
    ("made", "failed", "expected"),
    [
        ({"scene": 2, "character": 2}, {}, "success"),
        ({"scene": 1, "character": 1}, {"scene": 1, "character": 1}, "partial"),  # exactly 50 %
        ({"scene": 1, "character": 2}, {"scene": 1}, "partial"),
        ({"scene": 1, "character": 0}, {"character": 1}, None),  # 50 % but no character
        ({"scene": 0, "character": 2}, {"scene": 2}, None),  # every scene failed
        ({"scene": 1, "character": 1}, {"scene": 2, "character": 1}, None),  # 40 %
        ({}, {"scene": 1, "character": 1}, None),
    ],
)
def test_partial_success_rule(made: dict, failed: dict, expected: str | None) -> None:
    outcomes = [outcome(k, True) for k, n in made.items() for _ in range(n)]
    outcomes += [outcome(k, False) for k, n in failed.items() for _ in range(n)]
    assert decide_status(outcomes, len(outcomes)) == expected


def test_missing_outcomes_count_as_failures() -> None:
    # Four images planned, two reported: 50 % made, one scene and one character.
    assert decide_status([outcome("scene", True), outcome("character", True)], 4) == "partial"
    assert decide_status([outcome("scene", True), outcome("character", True)], 5) is None


def test_result_lists_made_images_by_kind() -> None:
    outcomes = [
        outcome("scene", True, "street"),
        outcome("character", True, "mara"),
        outcome("character", False, "voss"),
    ]
    result = build_result(
        job_id="j",
        outcomes=outcomes,
        total_images=3,
        total_cost=Decimal("0.010"),
        model_version="m",
        environment="production",
    )
    assert result is not None
    assert result.status == "partial"
    assert [r.scene_id for r in result.scene_references] == ["street"]
    assert [(r.scene_id, r.character_id) for r in result.character_references] == [(None, "mara")]
    assert result.total_references == 2
    assert result.total_generation_time == 3.0
    assert result.metadata.scenes_generated == 1 and result.metadata.characters_generated == 1
    assert result.model_dump(mode="json")["total_cost"] == "0.01"
