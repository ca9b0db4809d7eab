"""Prompt synthesis (SPEC §3)."""

from __future__ import annotations

from worker import constants as c
from worker.errors import InvalidPlanError
from worker.models import Character, Scene, Style

_QUALITY = "highly detailed, professional quality, 4K"
# The smallest description worth generating from; below this the style has crowded it out.
_MIN_DESCRIPTION_CHARS = 40


def style_suffix(style: Style) -> str:
    """Everything after the description. It is never shortened: it is what keeps every
    reference image of a job in one look."""
    clauses = []
    if style.visual_style:
        clauses.append(f"{style.visual_style} aesthetic")
    if style.color_palette:
        clauses.append(f"{' '.join(style.color_palette)} color scheme")
    clauses += [x for x in (style.lighting, style.cinematography) if x]
    clauses.append(_QUALITY)
    return ", ".join(clauses)


def character_description(character: Character) -> str:
    if character.features is not None:
        text = character.features.as_text()
        if text:
            return text
    if character.description:
        return character.description
    # Neither form given: the name and role are all there is to draw.
    return ", ".join(x for x in (character.name, character.role) if x) or "a person"


def build_prompt(description: str, style: Style) -> str:
    """``"{description}, {style part}"`` in at most 500 characters, shortening only the
    description, at a word boundary."""
    suffix = style_suffix(style)
    room = c.MAX_PROMPT_CHARS - len(suffix) - len(", ")
    if room < _MIN_DESCRIPTION_CHARS:
        raise InvalidPlanError(
            f"The style is too long: its part of the prompt is {len(suffix)} characters, "
            f"which leaves less than {_MIN_DESCRIPTION_CHARS} of the "
            f"{c.MAX_PROMPT_CHARS} for the description. Shorten the style fields."
        )
    return f"{_shorten(' '.join(description.split()), room)}, {suffix}"


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:-")


def scene_prompt(scene: Scene, style: Style) -> str:
    return build_prompt(scene.description, style)


def character_prompt(character: Character, style: Style) -> str:
    return build_prompt(character_description(character), style)
