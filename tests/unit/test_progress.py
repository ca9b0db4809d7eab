"""What `refgen run` prints: a summary that says how the job ended, and counts that never go
back, whatever order or repetition the events come in."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from tasks.progress import ProgressView, summary


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def event(event_type: str, **data: Any) -> str:
    return json.dumps({"event_type": event_type, "data": data, "published_at": 1.0})


def image(event_type: str, image_id: str, **data: Any) -> str:
    kind = "scene" if image_id.startswith("s") else "character"
    return event(event_type, image_type=kind, image_id=image_id, **data)


def finished(result_status: str, made: int, total: int, cost: str = "0.01") -> str:
    return event(
        "stage_update",
        status="failed" if result_status in ("text_only", "refused", "invalid") else "completed",
        total_images=total,
        successful_images=made,
        failed_images=total - made,
        total_cost=cost,
        total_time=5.2,
        result_status=result_status,
    )


def test_a_budget_refusal_says_so_with_its_figures() -> None:
    out = io.StringIO()
    view = ProgressView(out)
    view.handle(
        event(
            "error",
            reason="Budget exceeded: this job is estimated at $0.024 but its limit is $0.0033",
            message="Nothing was generated or charged; the pipeline continues text-only.",
            limit="0.0033",
            spent="0",
            estimated_cost="0.024",
            image_count=4,
        )
    )
    view.handle(finished("refused", 0, 0, cost="0"))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("error: Budget exceeded")
    assert lines[-1] == (
        "refused for budget: 4 images are estimated at $0.024, over the job's limit of "
        "$0.0033; nothing was generated or charged (text-only)"
    )
    assert "0/0" not in out.getvalue()
    assert view.finished


def test_a_text_only_job_says_how_many_images_were_made() -> None:
    line = summary(json.loads(finished("text_only", 2, 4))["data"])
    assert line.startswith("text-only: 2 of 4 images made, too few for reference images")
    assert "failed" not in line.split(";")[0]


@pytest.mark.parametrize(
    ("status", "made", "total", "expected"),
    [
        ("success", 4, 4, "completed: 4/4 images, $0.01, 5.2 s (success)"),
        ("partial", 3, 4, "completed: 3/4 images, $0.01, 5.2 s (partial: 1 failed)"),
    ],
)
def test_made_jobs_are_summarised(status: str, made: int, total: int, expected: str) -> None:
    assert summary(json.loads(finished(status, made, total))["data"]) == expected


def test_an_invalid_plan_gives_its_reason() -> None:
    error = {"reason": "The scene plan is invalid: scenes.0.id: bad"}
    line = summary(json.loads(finished("invalid", 0, 0))["data"], error)
    assert line == (
        "invalid plan: The scene plan is invalid: scenes.0.id: bad; nothing was generated "
        "or charged"
    )


def test_the_bar_never_goes_back_and_counts_each_image_once() -> None:
    view = ProgressView(Terminal())
    assert view.interactive
    shown = []
    stream = [
        event("stage_update", status="started", total_images=4),
        image("reference_generation_start", "s1", current_image=1, total_images=4),
        image("reference_generation_complete", "s1", cost="0.005", total_images=4),
        image("reference_generation_complete", "s1", cost="0.005", total_images=4),  # again
        image("reference_generation_retry", "c1", retry_count=1, total_images=4),
        image("reference_generation_retry", "c1", retry_count=1, total_images=4),  # again
        image("reference_generation_failed", "c1", total_images=4),
        image("reference_generation_complete", "c1", cost="0.005", total_images=4),  # late
        "not json",
        event("progress", progress=50),
        image("reference_generation_complete", "s2", cost="0.005", total_images=4),
    ]
    for raw in stream:
        view.handle(raw)
        shown.append(view.completed)
    view.close()
    assert shown == sorted(shown)  # never backwards
    assert (view.completed, view.done, view.failed, view.retries) == (3, 2, 1, 1)
    assert str(view.cost) == "0.010"
    assert not view.finished
