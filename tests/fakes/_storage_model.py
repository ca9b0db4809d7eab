"""Data model, wire formats and codecs used by :mod:`.supabase_server`."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ._http import Response, json_response

GATEWAY_MESSAGES = {  # what the API gateway (not the storage server) answers with
    502: "An invalid response was received from the upstream server",
    503: "failure to get a peer from the ring-balancer",
    504: "The upstream server is timing out",
}


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Bucket:
    id: str
    name: str
    public: bool
    file_size_limit: int | None
    allowed_mime_types: list[str] | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "owner": "",
            "public": self.public,
            "type": "STANDARD",
            "file_size_limit": self.file_size_limit,
            "allowed_mime_types": self.allowed_mime_types,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.created_at),
        }

    def allows(self, mime: str) -> bool:
        patterns = self.allowed_mime_types or ["*"]
        return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), mime) for p in patterns)


@dataclass(frozen=True)
class StoredObject:
    """An object exactly as stored: ``data`` is the raw file, never a multipart envelope."""

    bucket: str
    name: str
    data: bytes
    content_type: str  # as received (the multipart part's Content-Type for storage3)
    cache_control: str  # e.g. "max-age=3600"
    id: str
    created_at: datetime
    updated_at: datetime
    user_metadata: dict[str, Any] | None = None

    @property
    def etag(self) -> str:
        return f'"{hashlib.md5(self.data, usedforsecurity=False).hexdigest()}"'

    def metadata(self) -> dict[str, Any]:
        return {
            "eTag": self.etag,
            "size": len(self.data),
            "mimetype": self.content_type,
            "cacheControl": self.cache_control,
            "lastModified": iso(self.updated_at),
            "contentLength": len(self.data),
            "httpStatusCode": 200,
        }

    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": self.content_type,
            "Cache-Control": self.cache_control,
            "ETag": self.etag,
            "Last-Modified": self.updated_at.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        }

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "updated_at": iso(self.updated_at),
            "created_at": iso(self.created_at),
            "last_accessed_at": iso(self.updated_at),
            "metadata": self.metadata(),
        }

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.id,
            "bucket_id": self.bucket,
            "size": len(self.data),
            "content_type": self.content_type,
            "cache_control": self.cache_control,
            "etag": self.etag,
            "metadata": self.user_metadata,
            "last_modified": iso(self.updated_at),
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True)
class SignedUrlRecord:
    bucket: str
    path: str
    expires_in: int  # seconds, as requested
    token: str
    issued_at: int  # unix seconds on the fake clock (JWT "iat")
    expires_at: int  # JWT "exp"


@dataclass(frozen=True)
class Upload:
    data: bytes
    content_type: str
    cache_control: str
    metadata: dict[str, Any] | None


# ------------------------------------------------------------------------- errors
def storage_error(
    status_code: str, code: str, error: str, message: str, http: int = 400
) -> Response:
    """The storage server's error shape: HTTP 400 (500 for internal errors), statusCode a str."""
    body = {"statusCode": status_code, "code": code, "error": error, "message": message}
    return json_response(http, body)


def no_bucket() -> Response:
    return storage_error("404", "NoSuchBucket", "Bucket not found", "Bucket not found")


def no_key() -> Response:
    return storage_error("404", "NoSuchKey", "not_found", "Object not found")


def duplicate(code: str = "KeyAlreadyExists") -> Response:
    return storage_error("409", code, "Duplicate", "The resource already exists")


def too_large() -> Response:
    message = "The object exceeded the maximum allowed size"
    return storage_error("413", "EntityTooLarge", "Payload too large", message)


def invalid_mime(mime: str) -> Response:
    message = f"mime type {mime} is not supported"
    return storage_error("415", "InvalidMimeType", "invalid_mime_type", message)


def access_denied(message: str) -> Response:
    return storage_error("403", "AccessDenied", "Unauthorized", message)


def invalid_request(message: str) -> Response:
    return storage_error("400", "InvalidRequest", "Error", message)


def invalid_jwt(message: str) -> Response:
    return storage_error("400", "InvalidJWT", "InvalidJWT", message)


# ------------------------------------------------------------------------- codecs
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_jwt(secret: bytes, claims: Mapping[str, Any]) -> str:
    """An HS256 JWT, like the real server's signed-URL tokens."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{head}.{_b64(json.dumps(dict(claims)).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def verify_jwt(secret: bytes, token: str) -> dict[str, Any]:
    """Claims of an HS256 JWT; ValueError("jwt malformed" | "invalid signature")."""
    try:
        signing_input, _, sig = token.rpartition(".")
        claims: dict[str, Any] = json.loads(_unb64(signing_input.split(".")[1]))
        valid = hmac.compare_digest(
            hmac.new(secret, signing_input.encode(), hashlib.sha256).digest(), _unb64(sig)
        )
    except (IndexError, TypeError, ValueError) as exc:
        raise ValueError("jwt malformed") from exc
    if not valid:
        raise ValueError("invalid signature")
    return claims


def parse_size(value: Any) -> int | None:
    """file_size_limit as int bytes; the server also accepts strings like "5MB"."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*(B|KB|MB|GB)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {value!r}")
    units = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
    return int(m[1]) * units[(m[2] or "B").upper()]


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/form-data body into (lower-cased part headers, content) pairs."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        return []
    parts = []
    for chunk in body.split(b"--" + m[1].encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content.removesuffix(b"\r\n")))
    return parts


def parse_upload(body: bytes, headers: Mapping[str, str]) -> Upload | Response:
    """What the server stores for an upload: multipart (storage3) or a raw body."""
    ctype = headers.get("content-type", "application/octet-stream")
    cache = headers.get("cache-control", "no-cache")
    if not ctype.lower().startswith("multipart/form-data"):
        return Upload(body, ctype, f"max-age={cache}" if cache.isdigit() else cache, None)
    named: dict[str, tuple[dict[str, str], bytes]] = {}
    for part_headers, content in parse_multipart(body, ctype):
        disposition = part_headers.get("content-disposition", "")
        if found := re.search(r'(?:^|;)\s*name="([^"]*)"', disposition):
            named.setdefault(found[1], (part_headers, content))
    if "file" not in named:
        return invalid_request("No content provided")
    file_headers, data = named["file"]
    if "cacheControl" in named:
        cache = f"max-age={named['cacheControl'][1].decode()}"
    meta = json.loads(named["metadata"][1]) if "metadata" in named else None
    return Upload(data, file_headers.get("content-type", "text/plain"), cache, meta)


def list_folder(objects: Iterable[StoredObject], body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``POST /object/list``: one folder level under ``prefix``, like storage.search()."""
    prefix = str(body.get("prefix") or "")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    needle = (prefix + str(body.get("search") or "")).lower()
    folder = dict.fromkeys(("id", "updated_at", "created_at", "last_accessed_at", "metadata"))
    entries: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if obj.name.lower().startswith(needle):
            head, slash, _ = obj.name[len(prefix) :].partition("/")
            entries[head] = {**folder, "name": head} if slash else {**obj.row(), "name": head}
    sort = body.get("sortBy") or {}
    column = sort.get("column", "name")
    rows = sorted(  # NULLs (folders) sort last ascending / first descending, as in Postgres
        entries.values(),
        key=lambda r: (r.get(column) is None, r.get(column) or ""),
        reverse=sort.get("order") == "desc",
    )
    offset, limit = int(body.get("offset") or 0), int(body.get("limit") or 100)
    return rows[offset : offset + limit]
