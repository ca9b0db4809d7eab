"""A local fake of Supabase Storage (``/storage/v1``) speaking what ``storage3==2.34.1`` sends.

Usage::

    with FakeSupabaseStorage(service_key="svc") as fake:
        fake.create_bucket("refs", file_size_limit=10_000_000, allowed_mime_types=["image/*"])
        client = storage3.SyncStorageClient(fake.storage_url,  # "<url>/storage/v1/"
                                            {"apikey": "svc", "Authorization": "Bearer svc"})
        client.from_("refs").upload("a/b.png", png, {"content-type": "image/png", "upsert": "true"})

``fake.url`` plays ``SUPABASE_URL``; pass ``fake.storage_url`` (trailing slash) to storage3 --
without the slash storage3 emits a ``UserWarning`` and appends it.  Routes (under /storage/v1):

* buckets: ``GET/POST /bucket``, ``GET/DELETE /bucket/{id}``, ``POST /bucket/{id}/empty``.
* ``POST /object/{bucket}/{path}`` = upload, ``PUT`` = update.  storage3 always sends
  multipart/form-data: a ``cacheControl`` field (``"3600"`` -> stored ``max-age=3600``), an
  optional ``metadata`` field and the ``file`` part whose own Content-Type is
  ``file_options["content-type"]`` (default ``text/plain;charset=UTF-8``!).  ``"upsert": "true"``
  becomes header ``x-upsert: true`` (POST only).  Raw (non-multipart) bodies are accepted too.
* ``GET /object/{bucket}/{path}`` (also ``/object/authenticated/...``) = download;
  ``GET /object/info/{bucket}/{path}`` (used by ``exists()``).
* ``POST /object/sign/{bucket}/{path}`` with ``{"expiresIn": "60"}`` (a *string*) returns
  ``{"signedURL": "/object/sign/{bucket}/{path}?token=<JWT>"}``; storage3 joins it onto its base
  URL.  ``GET`` of that URL needs no auth.  Tokens are HS256 JWTs ``{url, iat, exp}`` like the
  real server's -- read them with ``decode_token`` / ``token_expiry`` / ``signed_urls``.
* ``POST /object/list/{bucket}`` with ``{prefix, limit, offset, sortBy, search}``: one folder
  level; files carry ``metadata {size, mimetype, ...}``, sub-folders have ``id: None``.
* ``DELETE /object/{bucket}`` with ``{"prefixes": [...]}`` -> list of deleted rows.

Auth: ``apikey`` must be an accepted key (else Kong-style HTTP 401 ``{"message": ...}``) and
``Authorization: Bearer <accepted key>`` (else HTTP 400 ``{"statusCode": "403", "error":
"Unauthorized", "code": "AccessDenied"}``).

Errors mirror the real server: HTTP 400 (500 for internal errors) with
``{"statusCode": "<str>", "code": ..., "error": ..., "message": ...}``.  storage3 raises
``storage3.exceptions.StorageApiError`` with ``.status = body["statusCode"]`` (a *str*, e.g.
``"409"``), ``.code = body["error"]`` (e.g. ``"Duplicate"``, ``"not_found"``, ``"Bucket not
found"``) and ``.message``.  The body's ``code`` (``KeyAlreadyExists`` ...) is only reachable via
``exc.__cause__.response.json()["code"]`` (``__cause__`` is the ``httpx.HTTPStatusError``).
Bodies without those keys (gateway 5xx, Kong 401) give ``code="InternalError"``, ``status=<int
HTTP status>`` and ``message="Unable to parse error message: <body>"``.

Fault injection (route kinds: ``bucket``, ``upload`` (POST *and* PUT), ``download``, ``info``,
``sign``, ``signed_download``, ``list``, ``remove``, ``unknown``, ``"*"``):
``inject(kind, Fault(...), times)``, ``fail_next_uploads``, ``delay_next_uploads``,
``reject_next_uploads_too_large``.  State helpers: ``create_bucket``, ``put_object``,
``get_object``, ``objects``, ``set_object_times`` (backdating), ``advance_clock``.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from ._http import FakeHTTPServer, Fault, RecordedRequest, Response, Route, json_response
from ._storage_model import (
    GATEWAY_MESSAGES,
    Bucket,
    SignedUrlRecord,
    StoredObject,
    Upload,
    access_denied,
    duplicate,
    invalid_jwt,
    invalid_mime,
    invalid_request,
    list_folder,
    no_bucket,
    no_key,
    parse_size,
    parse_upload,
    sign_jwt,
    storage_error,
    too_large,
    verify_jwt,
)

__all__ = [
    "Bucket",
    "FakeSupabaseStorage",
    "Fault",
    "SignedUrlRecord",
    "StoredObject",
    "storage_error",
]

_B, _K, _OBJ = r"(?P<bucket>[^/]+)", r"(?P<key>.+)", "/storage/v1/object"


def _key(m: re.Match[str]) -> tuple[str, str]:
    return unquote(m["bucket"]), "/".join(unquote(part) for part in m["key"].split("/"))


class FakeSupabaseStorage(FakeHTTPServer):
    def __init__(
        self,
        *,
        service_key: str = "fake-service-role-key",
        extra_keys: tuple[str, ...] = (),  # further accepted apikey/Bearer values
        # The project's anon key: accepted, but row-level security hides every bucket from it
        # and refuses its writes, as the real server does.
        anon_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_file_size: int = 50 * 1024 * 1024,  # project-wide limit (Supabase free tier)
    ) -> None:
        super().__init__(host=host, port=port)
        self.service_key = service_key
        self.anon_key = anon_key
        self.accepted_keys = {service_key, *extra_keys, *([anon_key] if anon_key else [])}
        self.max_file_size = max_file_size
        self.jwt_secret = secrets.token_bytes(32)
        self.clock_offset = 0.0  # seconds added to "now": token expiry and new timestamps
        self._buckets: dict[str, Bucket] = {}
        self._objects: dict[tuple[str, str], StoredObject] = {}
        self._signed: list[SignedUrlRecord] = []
        routes: list[tuple[str, str, str, Any]] = [
            ("GET", r"/storage/v1/bucket/?", "bucket", self._list_buckets),
            ("POST", r"/storage/v1/bucket/?", "bucket", self._create_bucket),
            ("GET", rf"/storage/v1/bucket/{_B}/?", "bucket", self._get_bucket),
            ("DELETE", rf"/storage/v1/bucket/{_B}/?", "bucket", self._delete_bucket),
            ("POST", rf"/storage/v1/bucket/{_B}/empty/?", "bucket", self._empty_bucket),
            ("POST", rf"{_OBJ}/list/{_B}/?", "list", self._list),
            ("POST", rf"{_OBJ}/sign/{_B}/{_K}", "sign", self._sign),
            ("GET", rf"{_OBJ}/sign/{_B}/{_K}", "signed_download", self._signed_download),
            ("GET", rf"{_OBJ}/info/(?:authenticated/)?{_B}/{_K}", "info", self._info),
            ("GET", rf"{_OBJ}/(?:authenticated/)?{_B}/{_K}", "download", self._download),
            ("POST", rf"{_OBJ}/{_B}/{_K}", "upload", self._upload),
            ("PUT", rf"{_OBJ}/{_B}/{_K}", "upload", self._upload),
            ("DELETE", rf"{_OBJ}/{_B}/?", "remove", self._remove),
        ]
        self._routes = [Route(m, re.compile(p), kind, fn) for m, p, kind, fn in routes]

    @property
    def storage_url(self) -> str:
        """``{SUPABASE_URL}/storage/v1/`` -- what to give ``storage3.SyncStorageClient``."""
        return f"{self.url}/storage/v1/"

    # ------------------------------------------------------------ state helpers
    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.clock_offset)

    def advance_clock(self, seconds: float) -> None:
        """Move the fake clock (signed-URL expiry, timestamps of new writes)."""
        with self._lock:
            self.clock_offset += seconds

    def create_bucket(
        self,
        bucket_id: str,
        *,
        public: bool = False,
        file_size_limit: int | str | None = None,
        allowed_mime_types: list[str] | None = None,
    ) -> Bucket:
        limit = parse_size(file_size_limit)
        bucket = Bucket(bucket_id, bucket_id, public, limit, allowed_mime_types, self.now())
        with self._lock:
            self._buckets[bucket_id] = bucket
        return bucket

    def delete_bucket(self, bucket_id: str) -> None:
        """Remove a bucket and everything in it (an operator's clean-up, all at once)."""
        with self._lock:
            self._buckets.pop(bucket_id, None)
            for key in [k for k in self._objects if k[0] == bucket_id]:
                del self._objects[key]

    @property
    def buckets(self) -> dict[str, Bucket]:
        with self._lock:
            return dict(self._buckets)

    def put_object(
        self, bucket: str, path: str, data: bytes, content_type: str = "image/png"
    ) -> StoredObject:
        """Seed an object directly (no HTTP, no checks)."""
        now = self.now()
        obj = StoredObject(
            bucket, path, data, content_type, "max-age=3600", str(uuid.uuid4()), now, now
        )
        with self._lock:
            self._objects[(bucket, path)] = obj
        return obj

    def get_object(self, bucket: str, path: str) -> StoredObject | None:
        with self._lock:
            return self._objects.get((bucket, path))

    def objects(self, bucket: str | None = None) -> list[StoredObject]:
        with self._lock:
            return [o for o in self._objects.values() if bucket in (None, o.bucket)]

    def set_object_times(
        self,
        bucket: str,
        path: str,
        *,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> StoredObject:
        """Backdate an object (e.g. for retention tests); list() reports the new times."""
        with self._lock:
            obj = self._objects[(bucket, path)]
            obj = replace(
                obj,
                created_at=created_at or obj.created_at,
                updated_at=updated_at or obj.updated_at,
            )
            self._objects[(bucket, path)] = obj
            return obj

    @property
    def signed_urls(self) -> list[SignedUrlRecord]:
        """Every signed URL issued, with its expiresIn / iat / exp."""
        with self._lock:
            return list(self._signed)

    def decode_token(self, token: str) -> dict[str, Any]:
        """Verified claims ``{url, iat, exp}`` of a signed-URL token (ValueError if bad)."""
        return verify_jwt(self.jwt_secret, token)

    def token_expiry(self, token: str) -> int:
        """Unix ``exp`` the token was issued with (``exp - iat`` == the requested expiresIn)."""
        return int(self.decode_token(token)["exp"])

    # ------------------------------------------------------------ fault helpers
    def fail_next_uploads(self, status: int = 503, times: int = 1) -> None:
        self.inject("upload", Fault(status), times)

    def delay_next_uploads(self, seconds: float, times: int = 1) -> None:
        self.inject("upload", Fault(delay=seconds), times)

    def reject_next_uploads_too_large(self, times: int = 1, http_status: int = 400) -> None:
        """EntityTooLarge body (statusCode "413"); HTTP 400 like the server, or e.g. 413."""
        resp = too_large()
        self.inject("upload", Fault(http_status, resp.body, resp.headers), times)

    def _default_fault_response(self, status: int) -> Response:
        if status in GATEWAY_MESSAGES:
            return json_response(status, {"message": GATEWAY_MESSAGES[status]})
        if status >= 500:
            message = "Internal server error"
            return storage_error(str(status), "InternalError", "InternalError", message, status)
        return storage_error(str(status), "InvalidRequest", "Error", f"fault {status}", status)

    def _not_found(self, req: RecordedRequest) -> Response:
        message = f"Route {req.method}:{req.path} not found"
        return json_response(404, {"message": message, "error": "Not Found", "statusCode": 404})

    # ------------------------------------------------------------ handlers
    def _auth(self, req: RecordedRequest) -> Response | None:
        apikey = req.headers.get("apikey")
        if not apikey:
            return json_response(401, {"message": "No API key found in request"})
        if apikey not in self.accepted_keys:
            return json_response(401, {"message": "Invalid API key"})
        scheme, _, token = req.headers.get("authorization", "").partition(" ")
        if not token.strip():
            return access_denied("jwt must be provided")
        if scheme.lower() != "bearer" or token.strip() not in self.accepted_keys:
            return access_denied("invalid signature")
        return None

    def _is_anon(self, req: RecordedRequest) -> bool:
        token = req.headers.get("authorization", "").partition(" ")[2].strip()
        return self.anon_key is not None and token == self.anon_key

    def _bucket(self, req: RecordedRequest, m: re.Match[str]) -> Bucket | Response:
        if err := self._auth(req):
            return err
        if self._is_anon(req):
            return no_bucket()  # row-level security hides it
        with self._lock:
            return self._buckets.get(unquote(m["bucket"])) or no_bucket()

    def _find(
        self, req: RecordedRequest, m: re.Match[str], auth: bool = True
    ) -> StoredObject | Response:
        if auth and (err := self._auth(req)):
            # The real server falls back to the anon role on the info and download routes:
            # a refused key reads as a missing bucket there.
            return no_bucket() if _refused_key(err) else err
        if auth and self._is_anon(req):
            return no_key()
        bucket, key = _key(m)
        with self._lock:
            if bucket not in self._buckets:
                return no_bucket()
            return self._objects.get((bucket, key)) or no_key()

    def _list_buckets(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth(req):
            return err
        return json_response(200, [b.to_json() for b in self.buckets.values()])

    def _create_bucket(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth(req):
            return err
        if self._is_anon(req):
            return row_level_security()
        body = req.json() or {}
        bucket_id = body.get("id") or body.get("name")
        if not isinstance(bucket_id, str) or not re.fullmatch(
            r"[\w!\-.*'() &$@=;:+,?]+", bucket_id
        ):
            return storage_error("400", "InvalidBucketName", "Invalid Input", "Bucket name invalid")
        try:
            limit = parse_size(body.get("file_size_limit"))
        except ValueError as exc:
            return invalid_request(str(exc))
        with self._lock:
            if bucket_id in self._buckets:
                return duplicate("BucketAlreadyExists")
            self.create_bucket(
                bucket_id,
                public=bool(body.get("public")),
                file_size_limit=limit,
                allowed_mime_types=body.get("allowed_mime_types"),
            )
        return json_response(200, {"name": bucket_id})

    def _get_bucket(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        bucket = self._bucket(req, m)
        return bucket if isinstance(bucket, Response) else json_response(200, bucket.to_json())

    def _delete_bucket(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        bucket = self._bucket(req, m)
        if isinstance(bucket, Response):
            return bucket
        with self._lock:
            if self.objects(bucket.id):
                message = "The bucket you tried to delete is not empty"
                return storage_error("409", "ResourceNotEmpty", "ResourceNotEmpty", message)
            del self._buckets[bucket.id]
        return json_response(200, {"message": "Successfully deleted"})

    def _empty_bucket(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        bucket = self._bucket(req, m)
        if isinstance(bucket, Response):
            return bucket
        with self._lock:
            for obj in self.objects(bucket.id):
                del self._objects[(obj.bucket, obj.name)]
        return json_response(200, {"message": "Successfully emptied"})

    def _upload(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if not self._auth(req) and self._is_anon(req):
            return row_level_security()
        bucket = self._bucket(req, m)
        if isinstance(bucket, Response):
            return bucket
        upload = parse_upload(req.body, req.headers)
        if not isinstance(upload, Upload):
            return upload
        mime = upload.content_type.split(";")[0].strip()
        if not bucket.allows(mime):
            return invalid_mime(mime)
        if len(upload.data) > min(bucket.file_size_limit or self.max_file_size, self.max_file_size):
            return too_large()
        key = _key(m)[1]
        with self._lock:
            old = self._objects.get((bucket.id, key))
            if req.method == "POST" and old and req.headers.get("x-upsert") != "true":
                return duplicate()
            if req.method == "PUT" and not old:
                return no_key()
            now = self.now()
            obj = StoredObject(
                bucket.id,
                key,
                upload.data,
                upload.content_type,
                upload.cache_control,
                old.id if old else str(uuid.uuid4()),
                old.created_at if old else now,
                now,
                upload.metadata,
            )
            self._objects[(bucket.id, key)] = obj
        return json_response(200, {"Id": obj.id, "Key": f"{bucket.id}/{key}"})

    def _serve(self, obj: StoredObject | Response, download: list[str] | None) -> Response:
        if isinstance(obj, Response):
            return obj
        headers = obj.headers()
        if download is not None:
            name = download[0] or obj.name.rsplit("/", 1)[-1]
            headers["Content-Disposition"] = f"attachment; filename={quote(name)};"
        return Response(200, obj.data, headers)

    def _download(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        return self._serve(self._find(req, m), req.query.get("download"))

    def _info(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        obj = self._find(req, m)
        return obj if isinstance(obj, Response) else json_response(200, obj.info())

    def _sign(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        obj = self._find(req, m)
        if isinstance(obj, Response):
            return obj
        raw = str((req.json() or {}).get("expiresIn"))  # storage3 sends a string
        if not raw.isdigit() or int(raw) < 1:
            return invalid_request("body/expiresIn must be >= 1")
        expires_in, iat = int(raw), int(time.time() + self.clock_offset)
        claims = {"url": f"{obj.bucket}/{obj.name}", "iat": iat, "exp": iat + expires_in}
        token = sign_jwt(self.jwt_secret, claims)
        record = SignedUrlRecord(obj.bucket, obj.name, expires_in, token, iat, iat + expires_in)
        with self._lock:
            self._signed.append(record)
        path = quote(f"{obj.bucket}/{obj.name}")
        return json_response(200, {"signedURL": f"/object/sign/{path}?token={token}"})

    def _signed_download(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        token = (req.query.get("token") or [""])[0]
        if not token:
            return invalid_request("querystring must have required property 'token'")
        try:
            claims = self.decode_token(token)
        except ValueError as exc:
            return invalid_jwt(str(exc))
        if claims.get("exp", 0) <= time.time() + self.clock_offset:
            return invalid_jwt("jwt expired")
        if claims.get("url") != "/".join(_key(m)):
            message = "The url do not match the signature"
            return storage_error("400", "InvalidSignature", "InvalidSignature", message)
        return self._serve(self._find(req, m, auth=False), req.query.get("download"))

    def _list(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if not self._auth(req) and self._is_anon(req):
            return json_response(200, [])  # sees no object, says nothing
        bucket = self._bucket(req, m)
        if isinstance(bucket, Response):
            return bucket
        return json_response(200, list_folder(self.objects(bucket.id), req.json() or {}))

    def _remove(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if not self._auth(req) and self._is_anon(req):
            return json_response(200, [])  # deletes nothing, says nothing
        bucket = self._bucket(req, m)
        if isinstance(bucket, Response):
            return bucket
        prefixes = (req.json() or {}).get("prefixes")
        if not isinstance(prefixes, list) or not prefixes:
            return invalid_request("body must have required property 'prefixes'")
        deleted = []
        with self._lock:
            for name in dict.fromkeys(prefixes):
                if obj := self._objects.pop((bucket.id, name), None):
                    deleted.append({"bucket_id": obj.bucket, "owner": "", **obj.row()})
        return json_response(200, deleted)


def row_level_security() -> Response:
    return storage_error(
        "403", "Unauthorized", "Unauthorized", "new row violates row-level security policy"
    )


def _refused_key(response: Response) -> bool:
    return b'"AccessDenied"' in (response.body or b"")
