"""Image storage: the ``ImageStore`` protocol and what passes through it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from worker import constants as c
from worker.errors import PermanentError


@dataclass(frozen=True)
class StoredObject:
    path: str
    size: int
    updated_at: datetime


class ImageStore(Protocol):
    """Stores PNGs at ``{job_id}/{kind}_{id}.png``. Raises ``RetryableError`` or
    ``PermanentError`` only."""

    def ensure_bucket(self) -> None: ...

    def put_png(self, path: str, data: bytes) -> None: ...

    def exists(self, path: str) -> bool: ...

    def signed_url(self, path: str, expires_in_s: int = c.SIGNED_URL_TTL_S) -> str: ...

    def list_prefix(self, prefix: str) -> list[StoredObject]: ...

    def list_job_prefixes(self) -> list[str]: ...

    def delete(self, paths: list[str]) -> None: ...


def check_png_size(data: bytes) -> None:
    if len(data) > c.MAX_IMAGE_BYTES:
        raise PermanentError(
            f"The image is too large to store: {len(data) / 1_048_576:.1f} MB, "
            f"the limit is {c.MAX_IMAGE_BYTES // 1_048_576} MB"
        )
