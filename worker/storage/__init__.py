"""Image storage: the ``ImageStore`` protocol and what passes through it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from worker import constants as c
from worker.errors import PermanentError
from worker.retry import storage_call


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


class StoreReadiness:
    """Can the store keep an image? Asked before every paid call, so that a store that refuses
    us (its key refused, its bucket missing and not creatable) stops the spending instead of
    failing each image after it was paid for. Once the bucket is known to exist, asking is
    free; after a refusal, or a cold start with storage down, the next paid call checks again
    (and creates the bucket if it is missing), so the worker recovers without a restart."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self._ready = False

    def check(self) -> None:
        """Raises ``RetryableError`` (store unreachable) or ``StoreRefusedError``."""
        if not self._ready:
            storage_call(self._store.ensure_bucket)
            self._ready = True

    def refused(self) -> None:
        self._ready = False
