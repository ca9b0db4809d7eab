"""The contracts: the upstream ``ScenePlan`` (SPEC §2) and ``ReferenceImages`` (SPEC §8)."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal, TypeVar
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    field_validator,
)

from worker import constants as c

ImageType = Literal["scene", "character"]
SafeId = Annotated[str, StringConstraints(pattern=c.ID_PATTERN)]
HexColor = Annotated[str, StringConstraints(pattern=r"^#(?:[0-9A-Fa-f]{3}){1,2}$")]


def money(amount: Decimal) -> str:
    """``0.024``, ``600``: plain decimal text, no exponent, no trailing zeros."""
    return format(amount.normalize(), "f")


# Money leaves the worker as a decimal string; floats would turn 0.0006525 into noise.
Money = Annotated[Decimal, PlainSerializer(money, return_type=str)]


class _Upstream(BaseModel):
    # The planner evolves: unknown fields are accepted and ignored.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class CharacterFeatures(_Upstream):
    hair: str | None = None
    face: str | None = None
    eyes: str | None = None
    clothing: str | None = None
    accessories: str | None = None
    build: str | None = None
    age: str | None = None

    def as_text(self) -> str:
        parts = (
            self.hair,
            self.face,
            self.eyes,
            self.clothing,
            self.accessories,
            self.build,
            self.age,
        )
        return ", ".join(p for p in parts if p)


class Character(_Upstream):
    id: SafeId
    role: str = ""
    name: str | None = None
    features: CharacterFeatures | None = None
    description: str | None = None


class Scene(_Upstream):
    id: SafeId
    description: str = Field(min_length=1)
    time_of_day: str | None = None


class Style(_Upstream):
    color_palette: list[HexColor] = Field(default_factory=list, max_length=32)
    visual_style: str = ""
    mood: str = ""
    lighting: str = ""
    cinematography: str = ""


class ScenePlan(_Upstream):
    job_id: UUID
    video_summary: str = ""
    characters: list[Character]
    scenes: list[Scene]
    style: Style
    clip_scripts: list[dict[str, object]] = Field(default_factory=list)
    transitions: list[dict[str, object]] = Field(default_factory=list)

    @field_validator("job_id", mode="before")
    @classmethod
    def _job_id_is_a_string(cls, value: object) -> object:
        # A UUID given as an int or bytes would round-trip to a different text form.
        if not isinstance(value, str | UUID):
            raise ValueError("job_id must be a UUID string")
        return value

    def unique_scenes(self) -> list[Scene]:
        return _first_by_id(self.scenes)

    def unique_characters(self) -> list[Character]:
        return _first_by_id(self.characters)


_T = TypeVar("_T", Scene, Character)


def _first_by_id(items: list[_T]) -> list[_T]:
    """Dedupe by id, first occurrence wins: a scene used by several clips is listed again."""
    seen: dict[str, _T] = {}
    for item in items:
        seen.setdefault(item.id, item)
    return list(seen.values())


class ImageSpec(BaseModel):
    """One unit of work in the chord: everything ``generate_reference`` needs, as JSON."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    image_type: ImageType
    image_id: SafeId
    prompt: str
    negative_prompt: str
    palette: list[str] = Field(default_factory=list)
    seed: int
    index: int = Field(ge=1)
    total: int = Field(ge=1)

    @property
    def key(self) -> str:
        """``scene_city_street``: unique within a job, and the object's file name."""
        return f"{self.image_type}_{self.image_id}"

    @property
    def storage_path(self) -> str:
        return f"{self.job_id}/{self.key}.png"


class ImageOutcome(BaseModel):
    """What a header task hands to ``finalize``, made or not. A failed image's task raises
    it inside ``ImageNotMade`` (tasks/backend.py), which still delivers it to the callback."""

    image_type: ImageType
    image_id: str
    ok: bool
    prompt_used: str
    image_url: str | None = None
    generation_time: float = 0.0
    cost: Money = Decimal(0)
    retry_count: int = 0
    reason: str | None = None


class ReferenceImage(BaseModel):
    scene_id: str | None = None
    character_id: str | None = None
    image_url: str
    prompt_used: str
    generation_time: float
    cost: Money


class ReferenceMetadata(BaseModel):
    dimensions: str = f"{c.IMAGE_SIZE}x{c.IMAGE_SIZE}"
    format: str = "PNG"
    scenes_generated: int
    characters_generated: int
    model_version: str
    environment: str


class ReferenceImages(BaseModel):
    job_id: str
    scene_references: list[ReferenceImage]
    character_references: list[ReferenceImage]
    total_references: int
    total_generation_time: float
    total_cost: Money
    status: Literal["success", "partial"]
    metadata: ReferenceMetadata
