"""A corpus of bad input, shared by the unit tests (validation) and the integration test
(sent by name to a real worker). Each case says whether it must be refused or may run."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = json.loads(
    (Path(__file__).resolve().parents[1] / "examples" / "plans" / "minimal_1x1.json").read_text()
)


@dataclass(frozen=True)
class Case:
    name: str
    plan: Any
    duration_seconds: Any = None
    refused: bool = True  # False: a sane result is the right answer
    job_id: Any = "from-plan"


def _with(**changes: Any) -> dict[str, Any]:
    plan = copy.deepcopy(BASE)
    plan.update(changes)
    return plan


def _scene(**changes: Any) -> dict[str, Any]:
    return _with(scenes=[{**BASE["scenes"][0], **changes}])


def _character(**changes: Any) -> dict[str, Any]:
    return _with(characters=[{**BASE["characters"][0], **changes}])


def cases() -> list[Case]:
    """Fresh job ids each call, so runs never share a job."""
    many_scenes = [{"id": f"s{i}", "description": f"scene {i}"} for i in range(10_000)]
    return [
        Case("plan is a list", [1, 2, 3]),
        Case("plan is a string", "not a plan"),
        Case("plan is null", None),
        Case("plan is a number", 42),
        Case("empty object", {}),
        Case("missing scenes", {k: v for k, v in _with().items() if k != "scenes"}),
        Case("missing characters", {k: v for k, v in _with().items() if k != "characters"}),
        Case("missing style", {k: v for k, v in _with().items() if k != "style"}),
        Case("scenes is a dict", _with(scenes={"id": "a"})),
        Case("scene id is a number", _scene(id=7)),
        Case("scene without description", _with(scenes=[{"id": "a"}])),
        Case("empty description", _scene(description="")),
        Case("id with a slash", _scene(id="a/b")),
        Case("id with dot-dot", _scene(id="..")),
        Case("id escaping the prefix", _scene(id="../../etc/passwd")),
        Case("id with NUL", _scene(id="a\x00b")),
        Case("id of 1,000 characters", _scene(id="a" * 1000)),
        Case("unicode id", _scene(id="场景")),
        Case("id with a space", _character(id="the hero")),
        Case("empty id", _character(id="")),
        Case("no scenes", _with(scenes=[])),
        Case("no characters", _with(characters=[])),
        Case("10,000 scenes", _with(scenes=many_scenes)),
        Case("palette of names", _with(style={**BASE["style"], "color_palette": ["red"]})),
        Case("palette is a string", _with(style={**BASE["style"], "color_palette": "#FFFFFF"})),
        Case("style too long", _with(style={**BASE["style"], "visual_style": "x" * 600})),
        Case("non-UUID job id", _with(job_id="not-a-uuid")),
        Case("job id is a number", _with(job_id=12345)),
        Case("job id mismatch", _with(), job_id=str(uuid.uuid4())),
        Case("negative duration", _with(), duration_seconds=-30),
        Case("duration is text", _with(), duration_seconds="three minutes"),
        Case("duration is infinite", _with(), duration_seconds="Infinity"),
        Case("features is a list", _character(features=["tall"])),
        # Input that is odd but fine: a sane result, not an error.
        Case("10 MB description", _scene(description="neon " * 2_000_000), refused=False),
        Case(
            "unicode everywhere", _scene(description="霓虹灯下的雨夜街道 🌧️, «ночь»"), refused=False
        ),
        Case(
            "duplicate ids, different descriptions",
            _with(
                scenes=[{"id": "a", "description": "first"}, {"id": "a", "description": "second"}]
            ),
            refused=False,
        ),
        Case(
            "unknown fields everywhere",
            _with(extra={"x": 1}, style={**BASE["style"], "y": 2}),
            refused=False,
        ),
    ]


def fresh(case: Case) -> tuple[str | Any, Any]:
    """The job id and plan to send for a case, with a fresh UUID where the plan has one."""
    plan = copy.deepcopy(case.plan)
    if isinstance(plan, dict) and plan.get("job_id") == BASE["job_id"]:
        plan["job_id"] = str(uuid.uuid4())
    if case.job_id != "from-plan":
        return case.job_id, plan
    job_id = plan.get("job_id") if isinstance(plan, dict) else None
    return (job_id if job_id is not None else str(uuid.uuid4())), plan
