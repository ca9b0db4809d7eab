"""Supabase Storage through ``storage3`` (SPEC §5).

The storage server answers HTTP 400 for almost every error and puts the real code in the body
as a string (``{"statusCode": "413", "error": "Payload too large", ...}``); storage3 hands that
over as ``StorageApiError.status``. Classification reads it, falling back to the HTTP status.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import structlog
from storage3 import SyncStorageClient
from storage3.exceptions import StorageApiError

from worker import constants as c
from worker.errors import (
    BucketMissingError,
    PermanentError,
    RefgenError,
    RetryableError,
    StoreRefusedError,
)
from worker.settings import Settings
from worker.storage import StoredObject, check_png_size
from worker.timebox import BoundedTimeoutTransport

log = structlog.get_logger(__name__)
_T = TypeVar("_T")

# storage3 maps these options onto headers: the key must be lowercase (a capitalised
# "Content-Type" leaves the multipart envelope's type in charge) and the values strings.
_UPLOAD_OPTIONS = {"content-type": "image/png", "upsert": "true", "cache-control": "3600"}
_REFUSED_KEY = "Supabase refused the service key"
_PERMANENT_REASONS = {
    "404": "The storage bucket or object does not exist",
    "409": "The object already exists",
    "413": f"The image is too large for the bucket (limit {c.MAX_IMAGE_BYTES // 1_048_576} MB)",
    "415": "The bucket does not accept this content type (image/png only)",
}


class SupabaseImageStore:
    def __init__(self, client: SyncStorageClient, bucket: str = c.DEFAULT_BUCKET) -> None:
        self._client = client
        self._bucket_id = bucket

    @classmethod
    def from_settings(cls, settings: Settings) -> SupabaseImageStore:
        assert settings.supabase_url and settings.supabase_service_key is not None
        key = settings.supabase_service_key.get_secret_value()
        headers = {"apiKey": key, "Authorization": f"Bearer {key}"}
        timeout = httpx.Timeout(30, connect=5)
        http = httpx.Client(
            headers=headers,
            timeout=timeout,
            # Never: on a cross-origin redirect httpx drops Authorization alone, so apiKey (the
            # service-role key) would go to whatever server the redirect names.
            follow_redirects=False,
            transport=BoundedTimeoutTransport(timeout),
        )
        client = SyncStorageClient(storage_url(settings.supabase_url), headers, http_client=http)
        return cls(client, settings.storage_bucket)

    @property
    def _bucket(self) -> Any:
        return self._client.from_(self._bucket_id)

    def ensure_bucket(self) -> None:
        """Create the private bucket if it is missing: 5 MB, image/png only."""
        try:
            self._call(lambda: self._client.get_bucket(self._bucket_id))
            return
        except PermanentError:
            pass
        try:
            self._call(
                lambda: self._client.create_bucket(
                    self._bucket_id,
                    options={
                        "public": False,
                        "file_size_limit": c.MAX_IMAGE_BYTES,
                        "allowed_mime_types": ["image/png"],
                    },
                )
            )
            log.info("bucket_created", bucket=self._bucket_id)
        except StoreRefusedError:
            # The key may not create it (the anon key, say, where the bucket only looked
            # missing): a refusal, never reported as a missing bucket.
            raise
        except PermanentError:
            # Another worker created it first: fine, as long as it exists now.
            self._call(lambda: self._client.get_bucket(self._bucket_id))

    def put_png(self, path: str, data: bytes) -> None:
        check_png_size(data)
        try:
            self._call(lambda: self._bucket.upload(path, data, _UPLOAD_OPTIONS))
        except BucketMissingError:
            # Deleted while we run, or never created because storage was down at start-up.
            log.warning("bucket_missing_recreating", bucket=self._bucket_id)
            self.ensure_bucket()
            self._call(lambda: self._bucket.upload(path, data, _UPLOAD_OPTIONS))

    def exists(self, path: str) -> bool:
        return bool(self._call(lambda: self._bucket.exists(path)))

    def signed_url(self, path: str, expires_in_s: int = c.SIGNED_URL_TTL_S) -> str:
        signed = self._call(lambda: self._bucket.create_signed_url(path, expires_in_s))
        url = signed.get("signedURL") or signed.get("signedUrl")
        if not url:
            raise RetryableError("Supabase returned no signed URL")
        return str(url)

    def list_prefix(self, prefix: str) -> list[StoredObject]:
        found: list[StoredObject] = []
        offset = 0
        while True:
            page = self._call(
                lambda o=offset: self._bucket.list(  # type: ignore[misc]
                    prefix.strip("/"), {"limit": 100, "offset": o}
                )
            )
            for entry in page:
                if entry.get("id") is None:
                    continue  # a folder placeholder
                metadata = entry.get("metadata") or {}
                stamp = entry.get("updated_at") or entry.get("created_at")
                found.append(
                    StoredObject(
                        path=f"{prefix.strip('/')}/{entry['name']}",
                        size=int(metadata.get("size", 0)),
                        updated_at=_parse_time(stamp),
                    )
                )
            if len(page) < 100:
                return found
            offset += 100

    def list_job_prefixes(self) -> list[str]:
        """Top-level folders: one per job."""
        page = self._call(lambda: self._bucket.list("", {"limit": 1000}))
        return [entry["name"] for entry in page if entry.get("id") is None]

    def delete(self, paths: list[str]) -> None:
        if paths:
            self._call(lambda: self._bucket.remove(paths))

    def _call(self, fn: Callable[[], _T]) -> _T:
        # Classification only: callers apply the retry policy (``worker.retry.storage_call``).
        return _classified(fn)


def storage_url(supabase_url: str) -> str:
    """Hosted Supabase serves storage under ``/storage/v1``; storage3 wants the full base,
    with a trailing slash so that relative paths join under it."""
    base = supabase_url.rstrip("/")
    if not base.endswith("/storage/v1"):
        base += "/storage/v1"
    return base + "/"


def _classified(fn: Callable[[], _T]) -> _T:
    try:
        return fn()
    except StorageApiError as exc:
        raise classify(exc) from None
    except httpx.TimeoutException:
        raise RetryableError("Supabase Storage did not answer in time") from None
    except httpx.TransportError:
        raise RetryableError("Could not reach Supabase Storage") from None
    except ValueError as exc:  # storage3 refuses dot segments in a key
        raise PermanentError(f"Refused storage path: {exc}") from None


def classify(exc: StorageApiError) -> RefgenError:
    code = str(exc.status)
    http_status = getattr(getattr(exc.__cause__, "response", None), "status_code", 0) or 0
    if code.startswith("3") or 300 <= http_status < 400:
        return PermanentError(
            f"Supabase Storage answered with a redirect ({code}), which is never followed "
            "with the service key: check SUPABASE_URL"
        )
    if (code.isdigit() and int(code) >= 500) or http_status >= 500 or code == "429":
        return RetryableError(f"Supabase Storage is having trouble ({code})")
    if code in ("401", "403"):
        return StoreRefusedError(_REFUSED_KEY)
    if code == "404" and "bucket" in f"{exc.code} {exc.message}".lower():
        return BucketMissingError("The storage bucket does not exist")
    reason = _PERMANENT_REASONS.get(code)
    if reason is None:
        reason = f"Supabase Storage refused the request ({code}: {str(exc.message)[:120]})"
    return PermanentError(reason)


def _parse_time(stamp: str | None) -> datetime:
    if not stamp:
        return datetime.now(UTC)
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
