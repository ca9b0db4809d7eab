from __future__ import annotations

import pytest

from worker import constants as c
from worker.errors import InvalidPlanError
from worker.models import Character, CharacterFeatures, Scene, Style
from worker.prompts import build_prompt, character_description, character_prompt, scene_prompt

STYLE = Style(
    color_palette=["#00FFFF", "#FF00FF", "#0000FF"],
    visual_style="Neo-noir cyberpunk",
    mood="tense",
    lighting="High-contrast neon with deep shadows",
    cinematography="Handheld tracking shots",
)


def test_scene_prompt_follows_the_template() -> None:
    prompt = scene_prompt(Scene(id="street", description="Rain-slicked street"), STYLE)
    assert prompt == (
        "Rain-slicked street, Neo-noir cyberpunk aesthetic, #00FFFF #FF00FF #0000FF color "
        "scheme, High-contrast neon with deep shadows, Handheld tracking shots, highly "
        "detailed, professional quality, 4K"
    )


def test_character_prompt_is_built_from_features_in_order() -> None:
    character = Character(
        id="mara",
        description="ignored when features exist",
        features=CharacterFeatures(
            hair="black bob",
            face="pale",
            eyes="grey",
            clothing="jacket",
            accessories="earring",
            build="slim",
            age="mid-20s",
        ),
    )
    prompt = character_prompt(character, STYLE)
    assert prompt.startswith("black bob, pale, grey, jacket, earring, slim, mid-20s, Neo-noir")
    assert "ignored" not in prompt


def test_character_falls_back_to_description_then_name() -> None:
    assert character_description(Character(id="v", description="Tall man")) == "Tall man"
    assert character_description(Character(id="v", name="Voss", role="villain")) == "Voss, villain"
    empty_features = Character(id="v", features=CharacterFeatures(), description="Tall man")
    assert character_description(empty_features) == "Tall man"


def test_long_description_is_shortened_and_style_kept_whole() -> None:
    description = " ".join(f"word{i}" for i in range(400))
    prompt = build_prompt(description, STYLE)
    assert len(prompt) <= c.MAX_PROMPT_CHARS
    assert prompt.endswith(scene_prompt(Scene(id="s", description="x"), STYLE)[len("x") :])
    head = prompt.split(", Neo-noir")[0]
    assert description.startswith(head)
    assert head.split()[-1] in description.split()  # cut at a word boundary


def test_palette_and_whitespace() -> None:
    prompt = build_prompt("a  street\n at night", STYLE)
    assert prompt.startswith("a street at night, ")
    assert "#00FFFF #FF00FF #0000FF color scheme" in prompt


def test_empty_style_fields_leave_no_dangling_clauses() -> None:
    prompt = build_prompt("a street", Style())
    assert prompt == "a street, highly detailed, professional quality, 4K"


def test_style_too_long_for_any_description_is_invalid_input() -> None:
    with pytest.raises(InvalidPlanError, match="style is too long"):
        build_prompt("a street", Style(visual_style="x" * 480))
