"""Bad input never crashes validation: it is refused with a readable reason, or runs sanely."""

from __future__ import annotations

import contextlib
import re
import string
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import Case, cases, fresh
from worker import constants as c
from worker.errors import InvalidPlanError
from worker.models import Style
from worker.planning import plan_job
from worker.prompts import build_prompt, style_suffix

CASES = cases()


def test_the_corpus_has_at_least_30_refusals() -> None:
    assert sum(case.refused for case in CASES) >= 30


def check(job_id: object, plan: object, duration: object = None):
    return plan_job(
        job_id, plan, duration, max_images=c.MAX_IMAGES_PER_JOB, per_minute=Decimal(200)
    )


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_corpus(case: Case) -> None:
    job_id, plan = fresh(case)
    if case.refused:
        with pytest.raises(InvalidPlanError) as info:
            check(job_id, plan, case.duration_seconds)
        reason = info.value.reason
        assert reason and len(reason) < 600 and "Traceback" not in reason
    else:
        job = check(job_id, plan, case.duration_seconds)
        assert all(len(i.prompt) <= c.MAX_PROMPT_CHARS for i in job.images)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
ids = st.text(alphabet=string.printable + "é/\x00", min_size=0, max_size=80)


@st.composite
def plans(draw: st.DrawFn) -> dict:
    """Plans that are nearly right: the shape of a ScenePlan with hostile values in it."""
    scene = st.fixed_dictionaries({"id": ids, "description": st.text(max_size=700)})
    character = st.fixed_dictionaries(
        {"id": ids, "role": st.text(max_size=10)},
        optional={
            "description": st.text(max_size=700),
            "features": st.dictionaries(
                st.sampled_from(["hair", "eyes", "age"]), st.text(max_size=200)
            ),
        },
    )
    return {
        "job_id": draw(st.uuids().map(str) | st.text(max_size=40)),
        "characters": draw(st.lists(character, max_size=5)),
        "scenes": draw(st.lists(scene, max_size=5)),
        "style": draw(
            st.fixed_dictionaries(
                {
                    "color_palette": st.lists(
                        st.sampled_from(["#000", "#FFAA00", "red"]), max_size=3
                    ),
                    "visual_style": st.text(max_size=200),
                }
            )
        ),
        "extra": draw(json_values),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), duration=st.none() | st.floats() | st.integers() | st.text(max_size=5))
def test_any_plan_is_refused_cleanly_or_planned_safely(plan: dict, duration: object) -> None:
    try:
        job = check(plan["job_id"], plan, duration)
    except InvalidPlanError as exc:
        reason = exc.reason
        assert reason
        return
    assert 1 <= len(job.images) <= c.MAX_IMAGES_PER_JOB
    assert job.scene_count >= 1 and job.character_count >= 1
    for image in job.images:
        assert len(image.prompt) <= c.MAX_PROMPT_CHARS
        assert image.storage_path == f"{job.job_id}/{image.image_type}_{image.image_id}.png"
        assert re.fullmatch(c.ID_PATTERN, image.image_id)


@settings(max_examples=300, deadline=None)
@given(plan=json_values)
def test_arbitrary_json_never_raises_anything_else(plan: object) -> None:
    # Refused or planned; any other exception fails the test.
    with contextlib.suppress(InvalidPlanError):
        check("11111111-2222-4333-8444-555555555555", plan)


@settings(max_examples=300, deadline=None)
@given(description=st.text(max_size=3000), visual=st.text(max_size=150))
def test_prompts_fit_and_keep_the_style_whole(description: str, visual: str) -> None:
    style = Style(visual_style=visual.strip(), color_palette=["#00FFFF"])
    prompt = build_prompt(description, style)
    assert len(prompt) <= c.MAX_PROMPT_CHARS
    assert prompt.endswith(style_suffix(style))
