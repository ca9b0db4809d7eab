"""Self-tests: drive the fakes with the real ``replicate`` and ``storage3`` clients."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import replicate
import storage3
from PIL import Image
from replicate.exceptions import ModelError, ReplicateError
from replicate.helpers import FileOutput
from storage3.exceptions import StorageApiError

from ._http import Fault
from .replicate_server import NSFW_ERROR, SDXL_MODEL, SDXL_VERSION, FakeReplicate, make_png
from .supabase_server import FakeSupabaseStorage

TOKEN = "r8_test_token"
KEY = "service-key"
PNG = make_png(1024, 1024)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def fake_replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate(api_token=TOKEN) as fake:
        yield fake


_OPEN: list[httpx.BaseTransport] = []


@pytest.fixture(autouse=True)
def _close_transports() -> Iterator[None]:
    """replicate.Client has no close(); closing the transport we hand it frees its sockets."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def tracked(transport: httpx.BaseTransport | None = None) -> httpx.BaseTransport:
    _OPEN.append(transport or httpx.HTTPTransport())
    return _OPEN[-1]


def make_client(fake: FakeReplicate, token: str = TOKEN, **kwargs: Any) -> replicate.Client:
    transport = tracked(kwargs.pop("transport", None))
    client = replicate.Client(api_token=token, base_url=fake.url, transport=transport, **kwargs)
    client.poll_interval = 0.02  # default 0.5 s, from REPLICATE_POLL_INTERVAL
    return client


@pytest.fixture
def rc(fake_replicate: FakeReplicate) -> replicate.Client:
    return make_client(fake_replicate)


@pytest.fixture
def fake_storage() -> Iterator[FakeSupabaseStorage]:
    with FakeSupabaseStorage(service_key=KEY) as fake:
        fake.create_bucket("refs", file_size_limit=5_000_000, allowed_mime_types=["image/*"])
        yield fake


@pytest.fixture
def sc(fake_storage: FakeSupabaseStorage) -> Iterator[storage3.SyncStorageClient]:
    headers = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}
    with storage3.SyncStorageClient(fake_storage.storage_url, headers) as client:
        yield client


def image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


# ---------------------------------------------------------------------------- replicate
@pytest.mark.parametrize("ref", [SDXL_VERSION, f"{SDXL_MODEL}:{SDXL_VERSION}"])
def test_create_wait_download(fake_replicate: FakeReplicate, rc: replicate.Client, ref: str):
    prediction = rc.predictions.create(version=ref, input={"prompt": "a red fox"})
    assert prediction.status == "starting"
    assert prediction.urls["get"] == f"{fake_replicate.url}/v1/predictions/{prediction.id}"
    prediction.wait()
    assert prediction.status == "succeeded"
    assert (prediction.model, prediction.version) == (SDXL_MODEL, SDXL_VERSION)
    assert prediction.metrics["predict_time"] == 2.5
    assert prediction.completed_at
    assert prediction.started_at
    assert prediction.error is None
    assert prediction.output == [f"{fake_replicate.url}/files/{prediction.id}.png"]
    data = FileOutput(prediction.output[0], rc).read()
    assert image_size(data) == (1024, 1024)

    create = fake_replicate.requests_for("create")[0]
    assert (create.method, create.path) == ("POST", "/v1/predictions")
    assert create.json() == {"input": {"prompt": "a red fox"}, "version": ref}  # sent verbatim
    assert create.headers["authorization"] == f"Bearer {TOKEN}"
    assert "prefer" not in create.headers
    assert fake_replicate.creates[0].version_field == ref
    assert fake_replicate.create_count == 1
    assert fake_replicate.get_count(prediction.id) >= 1
    stamps = [r.timestamp for r in fake_replicate.requests]
    assert stamps == sorted(stamps)


def test_status_progression_and_reload(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.script_next_prediction(duration=0.4, starting_for=0.1)
    p = rc.predictions.create(version=SDXL_VERSION, input={"prompt": "x"})
    seen = [p.status]
    while p.status not in ("succeeded", "failed", "canceled"):
        time.sleep(0.03)
        p.reload()
        seen.append(p.status)
    assert seen[0] == "starting"
    assert "processing" in seen
    assert seen[-1] == "succeeded"
    assert rc.predictions.get(p.id).status == "succeeded"


def test_prefer_wait_and_run(fake_replicate: FakeReplicate, rc: replicate.Client):
    p = rc.predictions.create(version=SDXL_VERSION, input={"prompt": "x"}, wait=5)
    assert p.status == "succeeded"  # held until terminal
    assert fake_replicate.requests_for("create")[0].headers["prefer"] == "wait=5"

    out = rc.run(f"{SDXL_MODEL}:{SDXL_VERSION}", input={"prompt": "y"})
    assert isinstance(out, list)
    assert isinstance(out[0], str)
    routes = [(r.method, r.path) for r in fake_replicate.requests[-2:]]
    assert routes == [
        ("POST", "/v1/predictions"),
        ("GET", f"/v1/models/{SDXL_MODEL}/versions/{SDXL_VERSION}"),
    ]
    assert fake_replicate.creates[-1].version_field == SDXL_VERSION  # run() strips owner/name
    assert fake_replicate.creates[-1].prefer == "wait"

    rc.predictions.create(model=SDXL_MODEL, input={"prompt": "z"})
    assert fake_replicate.requests[-1].path == f"/v1/models/{SDXL_MODEL}/predictions"


def test_bad_token_is_401_problem(fake_replicate: FakeReplicate):
    client = make_client(fake_replicate, token="wrong")
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version=SDXL_VERSION, input={})
    assert (info.value.status, info.value.title) == (401, "Unauthenticated")
    assert "authentication token" in (info.value.detail or "")


def test_the_account_through_the_official_client(fake_replicate: FakeReplicate, rc):
    """``accounts.current()`` (GET /v1/account), which the worker's warm-up sends: the token's
    account, and a 401 problem for a wrong token; each request records its connection's port."""
    account = rc.accounts.current()
    assert (account.type, account.username) == ("organization", "acme")
    with pytest.raises(ReplicateError) as info:
        make_client(fake_replicate, token="wrong").accounts.current()
    assert info.value.status == 401
    ports = [r.client_port for r in fake_replicate.requests_for("account")]
    assert len(ports) == 2 and all(port > 0 for port in ports)


def test_429_and_retry_after_via_event_hook(fake_replicate: FakeReplicate):
    seen: list[str | None] = []

    def on_response(response: httpx.Response) -> None:
        if response.status_code == 429:
            seen.append(response.headers.get("Retry-After"))

    client = make_client(fake_replicate, event_hooks={"response": [on_response]})
    fake_replicate.throttle_next_creates(retry_after=7)
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version=SDXL_VERSION, input={"prompt": "x"})
    assert info.value.status == 429
    assert info.value.detail == "Request was throttled. Your rate limit resets in ~7s."
    assert seen == ["7"]
    assert client.predictions.create(version=SDXL_VERSION, input={}).status == "starting"
    assert fake_replicate.create_count == 2
    assert len(fake_replicate.creates) == 1


class RecordingTransport(httpx.BaseTransport):
    """A transport passed via ``replicate.Client(transport=...)`` (wrapped by RetryTransport)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.retry_after: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if "retry-after" in response.headers:
            self.retry_after.append(response.headers["retry-after"])
        return response

    def close(self) -> None:
        self.inner.close()


def test_retry_after_via_transport(fake_replicate: FakeReplicate):
    transport = RecordingTransport()
    client = make_client(fake_replicate, transport=transport)
    fake_replicate.throttle_next_creates(retry_after=3)
    with pytest.raises(ReplicateError):
        client.predictions.create(version=SDXL_VERSION, input={})
    assert transport.retry_after == ["3"]


def test_5xx_and_422_on_create(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.fail_next_creates(503, times=2)
    for _ in range(2):
        with pytest.raises(ReplicateError) as info:  # POST is never retried by the client
            rc.predictions.create(version=SDXL_VERSION, input={})
        assert info.value.status == 503
        assert info.value.detail
    fake_replicate.reject_next_create_invalid_version()
    with pytest.raises(ReplicateError) as info:
        rc.predictions.create(version=SDXL_VERSION, input={})
    assert info.value.status == 422
    assert "version does not exist" in (info.value.detail or "")
    assert rc.predictions.create(version=SDXL_VERSION, input={}).status == "starting"
    assert fake_replicate.create_count == 4


def test_known_versions_rejects_unknown(fake_replicate: FakeReplicate):
    with FakeReplicate(api_token=TOKEN, known_versions={SDXL_VERSION: SDXL_MODEL}) as strict:
        client = make_client(strict)
        with pytest.raises(ReplicateError) as info:
            client.predictions.create(version="deadbeef", input={})
        assert info.value.status == 422
        assert client.predictions.create(version=SDXL_VERSION, input={}).model == SDXL_MODEL


def test_hang_then_cancel(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.hang_next_prediction()
    p = rc.predictions.create(version=SDXL_VERSION, input={})
    time.sleep(0.5)
    p.reload()
    assert p.status == "processing"
    canceled = rc.predictions.cancel(p.id)
    assert canceled.status == "canceled"
    assert canceled.completed_at
    p.wait()
    assert p.status == "canceled"
    assert fake_replicate.cancels == [p.id]
    assert fake_replicate.requests_for("cancel")[0].path == f"/v1/predictions/{p.id}/cancel"


def test_failed_prediction(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.fail_next_prediction()
    p = rc.predictions.create(version=SDXL_VERSION, input={})
    p.wait()
    assert (p.status, p.error, p.output) == ("failed", NSFW_ERROR, None)
    fake_replicate.fail_next_prediction()
    with pytest.raises(ModelError, match="NSFW"):
        rc.run(f"{SDXL_MODEL}:{SDXL_VERSION}", input={})


def test_get_faults(fake_replicate: FakeReplicate, rc: replicate.Client):
    p = rc.predictions.create(version=SDXL_VERSION, input={})
    fake_replicate.fail_next_gets(500)
    with pytest.raises(ReplicateError) as info:
        p.reload()
    assert info.value.status == 500
    fake_replicate.fail_next_gets(503, times=2)  # GET 503s are retried by RetryTransport
    before = fake_replicate.get_count()
    p.reload()
    assert fake_replicate.get_count() == before + 3


def test_metrics_omitted_and_custom_image():
    with FakeReplicate(api_token=TOKEN, image_size=(64, 32)) as fake:
        client = make_client(fake)
        fake.script_next_prediction(predict_time=None)
        p = client.predictions.create(version=SDXL_VERSION, input={})
        p.wait()
        assert "predict_time" not in (p.metrics or {})
        assert image_size(httpx.get(p.output[0]).content) == (64, 32)
        fake.image_bytes, fake.image_content_type = b"<html>nope</html>", "text/html"
        q = client.predictions.create(version=SDXL_VERSION, input={})
        q.wait()
        resp = httpx.get(q.output[0])
        assert resp.content == b"<html>nope</html>"
        assert resp.headers["content-type"] == "text/html"


def test_timeout_and_disconnect(fake_replicate: FakeReplicate):
    client = make_client(fake_replicate, timeout=httpx.Timeout(0.2))
    p = client.predictions.create(version=SDXL_VERSION, input={})
    fake_replicate.delay_next("get", 1.0)
    with pytest.raises(httpx.ReadTimeout):
        p.reload()
    # Pitfall pinned by this test: predictions.create() without wait= passes timeout=None to
    # httpx, i.e. *no timeout at all* -- the client's timeout does not apply to the POST.
    fake_replicate.delay_next("create", 0.5)
    assert client.predictions.create(version=SDXL_VERSION, input={}).id
    fake_replicate.inject("create", Fault(disconnect=True))
    with pytest.raises(httpx.RemoteProtocolError):
        client.predictions.create(version=SDXL_VERSION, input={})


def test_base_url_from_env(fake_replicate: FakeReplicate, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REPLICATE_BASE_URL", fake_replicate.url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", TOKEN)
    client = replicate.Client(transport=tracked())
    assert client.predictions.create(version=SDXL_VERSION, input={}).id
    assert fake_replicate.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"


# ---------------------------------------------------------------------------- storage
def test_buckets(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    sc.create_bucket("other", options={"public": True, "file_size_limit": 10})
    assert sc.get_bucket("other").file_size_limit == 10
    assert {b.id for b in sc.list_buckets()} == {"refs", "other"}
    assert sc.get_bucket("refs").allowed_mime_types == ["image/*"]
    with pytest.raises(StorageApiError) as info:
        sc.create_bucket("other")
    assert (info.value.status, info.value.code) == ("409", "Duplicate")
    with pytest.raises(StorageApiError) as info:
        sc.get_bucket("missing")
    assert (info.value.status, info.value.code) == ("404", "Bucket not found")
    assert info.value.__cause__.response.json()["code"] == "NoSuchBucket"


def test_upload_stores_raw_png(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    opts = {"content-type": "image/png", "upsert": "true"}
    res = sc.from_("refs").upload("job1/scene 1.png", PNG, opts)
    assert res.full_path == "refs/job1/scene 1.png"
    obj = fake_storage.get_object("refs", "job1/scene 1.png")
    assert obj is not None
    assert (obj.content_type, obj.data, obj.cache_control) == ("image/png", PNG, "max-age=3600")
    req = fake_storage.requests_for("upload")[0]
    assert (req.method, req.path) == ("POST", "/storage/v1/object/refs/job1/scene%201.png")
    assert req.headers["x-upsert"] == "true"
    assert req.headers["apikey"] == KEY
    assert req.headers["content-type"].startswith("multipart/form-data")

    first = obj
    time.sleep(0.01)
    sc.from_("refs").upload("job1/scene 1.png", PNG[:100], opts)  # upsert overwrites
    again = fake_storage.get_object("refs", "job1/scene 1.png")
    assert again is not None
    assert again.data == PNG[:100]
    assert again.created_at == first.created_at
    assert again.updated_at > first.updated_at
    assert sc.from_("refs").download("job1/scene 1.png") == PNG[:100]

    with pytest.raises(StorageApiError) as info:
        sc.from_("refs").upload("job1/scene 1.png", PNG, {"content-type": "image/png"})
    err = info.value
    assert (err.status, err.code, err.message) == (
        "409",
        "Duplicate",
        "The resource already exists",
    )
    assert err.__cause__.response.status_code == 400
    assert err.__cause__.response.json()["code"] == "KeyAlreadyExists"


def test_signed_url(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    sc.from_("refs").upload("a/b.png", PNG, {"content-type": "image/png"})
    signed = sc.from_("refs").create_signed_url("a/b.png", 600)
    url = signed["signedURL"]
    assert url.startswith(f"{fake_storage.storage_url}object/sign/refs/a/b.png?token=")
    assert fake_storage.requests_for("sign")[0].json() == {"expiresIn": "600"}
    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.content == PNG
    assert resp.headers["content-type"] == "image/png"
    record = fake_storage.signed_urls[0]
    token = url.split("token=")[1]
    assert record.token == token
    assert record.expires_in == 600
    claims = fake_storage.decode_token(token)
    assert claims["url"] == "refs/a/b.png"
    assert claims["exp"] - claims["iat"] == 600
    assert fake_storage.token_expiry(token) == record.expires_at

    bad = httpx.get(url[:-3] + "abc")
    assert bad.status_code == 400
    assert bad.json()["error"] == "InvalidJWT"
    fake_storage.advance_clock(601)
    expired = httpx.get(url)
    assert expired.status_code == 400
    assert expired.json()["message"] == "jwt expired"


def test_storage_errors(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    def code_of(call: Any) -> tuple[Any, str, str]:
        with pytest.raises(StorageApiError) as info:
            call()
        body = info.value.__cause__.response.json()
        return info.value.status, info.value.code, body.get("code", "")

    refs, png = sc.from_("refs"), {"content-type": "image/png"}
    fake_storage.create_bucket("tiny", file_size_limit=10)
    assert code_of(lambda: sc.from_("nope").upload("x.png", PNG, png)) == (
        "404",
        "Bucket not found",
        "NoSuchBucket",
    )
    assert code_of(lambda: refs.download("missing.png")) == ("404", "not_found", "NoSuchKey")
    assert code_of(lambda: sc.from_("tiny").upload("x.png", PNG, png)) == (
        "413",
        "Payload too large",
        "EntityTooLarge",
    )
    assert code_of(lambda: refs.upload("x.txt", b"hi", {"content-type": "text/plain"})) == (
        "415",
        "invalid_mime_type",
        "InvalidMimeType",
    )
    assert code_of(lambda: refs.upload("x.bin", b"hi")) == (  # storage3 default is text/plain
        "415",
        "invalid_mime_type",
        "InvalidMimeType",
    )
    assert not refs.exists("missing.png")

    url = fake_storage.storage_url
    with storage3.SyncStorageClient(url, {"apikey": KEY, "Authorization": "Bearer x"}) as bad:
        denied = code_of(lambda: bad.get_bucket("refs"))
        # As the real server: the download and info routes fall back to the anon role, so a
        # refused key reads as a missing bucket there.
        fallback = code_of(lambda: bad.from_("refs").download("a.png"))
    assert denied == ("403", "Unauthorized", "AccessDenied")
    assert fallback == ("404", "Bucket not found", "NoSuchBucket")
    nokey = storage3.SyncStorageClient(url, {"Authorization": f"Bearer {KEY}"})
    with nokey, pytest.raises(StorageApiError) as info:
        nokey.list_buckets()
    assert (info.value.status, info.value.code) == (401, "InternalError")  # Kong body: no keys


def test_list_and_remove(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    refs = sc.from_("refs")
    for name in ("job/a.png", "job/b.png", "job/sub/c.png", "other/d.png"):
        refs.upload(name, PNG, {"content-type": "image/png"})
    old = datetime.now(UTC) - timedelta(days=30)
    fake_storage.set_object_times("refs", "job/a.png", created_at=old, updated_at=old)

    rows = refs.list("job")
    assert [r["name"] for r in rows] == ["a.png", "b.png", "sub"]
    assert rows[0]["metadata"]["size"] == len(PNG)
    assert rows[0]["metadata"]["mimetype"] == "image/png"
    assert rows[0]["created_at"].startswith(old.strftime("%Y-%m-%dT%H:%M"))
    assert rows[2]["id"] is None
    assert [r["name"] for r in refs.list()] == ["job", "other"]
    newest = refs.list("job", {"limit": 2, "sortBy": {"column": "created_at", "order": "desc"}})
    assert [r["name"] for r in newest] == ["sub", "b.png"]  # NULLs (folders) first, as Postgres
    assert fake_storage.requests_for("list")[0].json()["prefix"] == "job"

    deleted = refs.remove(["job/a.png", "job/missing.png"])
    assert [d["name"] for d in deleted] == ["job/a.png"]
    assert fake_storage.get_object("refs", "job/a.png") is None
    assert fake_storage.requests_for("remove")[0].json() == {
        "prefixes": ["job/a.png", "job/missing.png"]
    }


def test_storage_faults(fake_storage: FakeSupabaseStorage, sc: storage3.SyncStorageClient):
    refs, png = sc.from_("refs"), {"content-type": "image/png"}
    fake_storage.fail_next_uploads(503)
    with pytest.raises(StorageApiError) as info:
        refs.upload("x.png", PNG, png)
    assert (info.value.status, info.value.code) == (503, "InternalError")
    fake_storage.fail_next_uploads(500)
    with pytest.raises(StorageApiError) as info:
        refs.upload("x.png", PNG, png)
    assert (info.value.status, info.value.code) == ("500", "InternalError")
    fake_storage.reject_next_uploads_too_large(http_status=413)
    with pytest.raises(StorageApiError) as info:
        refs.upload("x.png", PNG, png)
    assert info.value.status == "413"
    assert info.value.__cause__.response.status_code == 413
    assert fake_storage.get_object("refs", "x.png") is None

    fake_storage.delay_next_uploads(1.0)
    headers = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=0.2) as http:
        slow = storage3.SyncStorageClient(fake_storage.storage_url, headers, http_client=http)
        with pytest.raises(httpx.ReadTimeout):
            slow.from_("refs").upload("x.png", PNG, png)
        refs.upload("x.png", PNG, png)
    assert fake_storage.get_object("refs", "x.png") is not None
    assert len(fake_storage.requests_for("upload")) == 5
    assert not fake_storage.handler_errors


def test_prefer_wait_times_out_on_hang(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.hang_next_prediction()
    started = time.monotonic()
    p = rc.predictions.create(version=SDXL_VERSION, input={}, wait=1)
    assert p.status == "processing"
    assert 0.9 < time.monotonic() - started < 5


def test_concurrent_clients(fake_replicate: FakeReplicate, fake_storage: FakeSupabaseStorage):
    from concurrent.futures import ThreadPoolExecutor

    headers = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}

    def job(i: int) -> bytes:
        client = make_client(fake_replicate)
        p = client.predictions.create(version=SDXL_VERSION, input={"prompt": str(i)})
        p.wait()
        data = FileOutput(p.output[0], client).read()
        with storage3.SyncStorageClient(fake_storage.storage_url, headers) as sc:
            sc.from_("refs").upload(f"c/{i}.png", data, {"content-type": "image/png"})
            return sc.from_("refs").download(f"c/{i}.png")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(job, range(16)))
    assert all(r == PNG for r in results)
    assert len(fake_replicate.creates) == 16
    assert {c.input["prompt"] for c in fake_replicate.creates} == {str(i) for i in range(16)}
    assert len(fake_storage.objects("refs")) == 16
    assert not fake_replicate.handler_errors
    assert not fake_storage.handler_errors


# ------------------------------------------------- sync mode, deadlines, limits, billing
PRICE = Decimal("0.000725")


def create_raw(client: replicate.Client, **headers: str) -> dict[str, Any]:
    """A create with headers ``predictions.create`` cannot send, through the client's own
    request method (what the worker does); the JSON as it comes, ``aborted`` included."""
    response = client._request(
        "POST",
        "/v1/predictions",
        json={"version": SDXL_VERSION, "input": {"prompt": "x", "seed": 1}},
        headers=headers,
        timeout=httpx.Timeout(70, connect=5),
    )
    return response.json()


def test_prefer_wait_holds_until_terminal_and_no_longer(
    fake_replicate: FakeReplicate, rc: replicate.Client
):
    fake_replicate.script_next_prediction(duration=0.6, starting_for=0.1, predict_time=0.5)
    started = time.monotonic()
    done = create_raw(rc, Prefer="wait=5")
    took = time.monotonic() - started
    assert done["status"] == "succeeded" and done["output"]
    assert 0.6 <= took < 1.5  # answered when it ended, not when the 5 s hold was up
    fake_replicate.script_next_prediction(duration=3.0, starting_for=0.2)
    started = time.monotonic()
    held = create_raw(rc, Prefer="wait=1")
    assert held["status"] == "processing"  # the prediction as it stands after N s
    assert 1.0 <= time.monotonic() - started < 2.0


def test_cancel_wakes_a_held_create(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.hang_next_prediction()
    box: list[dict[str, Any]] = []
    thread = threading.Thread(target=lambda: box.append(create_raw(rc, Prefer="wait=10")))
    thread.start()
    while not fake_replicate.creates:
        time.sleep(0.01)
    time.sleep(0.3)
    rc.predictions.cancel(fake_replicate.creates[0].prediction_id)
    thread.join(timeout=3)
    assert box and box[0]["status"] == "canceled"
    assert box[0]["metrics"]["predict_time"] > 0  # it ran, and is billed for that


def test_cancel_after_before_start_aborts_unbilled(
    fake_replicate: FakeReplicate, rc: replicate.Client
):
    fake_replicate.script_next_prediction(starting_for=5.0, duration=6.0)
    started = time.monotonic()
    aborted = create_raw(rc, Prefer="wait=10", **{"Cancel-After": "1s"})
    assert 1.0 <= time.monotonic() - started < 2.0
    assert aborted["status"] == "aborted"
    assert aborted["started_at"] is None and aborted["completed_at"]
    assert "predict_time" not in aborted["metrics"]
    assert fake_replicate.creates[0].cancel_after == "1s"
    assert fake_replicate.billed(PRICE) == 0


def test_cancel_after_while_running_cancels_billed_for_the_time_run(
    fake_replicate: FakeReplicate, rc: replicate.Client
):
    fake_replicate.script_next_prediction(starting_for=0.2, outcome="hang")
    canceled = create_raw(rc, Prefer="wait=10", **{"Cancel-After": "1s"})
    assert canceled["status"] == "canceled"
    assert canceled["started_at"] is not None
    assert canceled["metrics"]["predict_time"] == pytest.approx(0.8, abs=0.01)
    pid = canceled["id"]
    assert fake_replicate.bills(PRICE)[pid] == Decimal("0.8") * PRICE
    # Past its end nothing changes: an explicit cancel of a finished prediction is a no-op.
    rc.predictions.cancel(pid)
    assert fake_replicate.prediction_json(pid)["metrics"]["predict_time"] == 0.8


def test_cancel_after_formats_and_a_server_that_ignores_it(
    fake_replicate: FakeReplicate, rc: replicate.Client
):
    from tests.fakes._replicate_model import parse_cancel_after

    assert parse_cancel_after("1m30s") == 90
    assert parse_cancel_after("250ms") == 0.25
    assert parse_cancel_after("90") is None and parse_cancel_after("soon") is None
    with pytest.raises(ReplicateError) as info:
        create_raw(rc, **{"Cancel-After": "soon"})
    assert info.value.status == 422
    fake_replicate.honour_cancel_after = False
    fake_replicate.hang_next_prediction()
    assert create_raw(rc, Prefer="wait=1", **{"Cancel-After": "1s"})["status"] == "processing"


def test_billing_counts_what_ran(fake_replicate: FakeReplicate, rc: replicate.Client):
    fake_replicate.script_next_prediction(duration=0.2, predict_time=2.5)
    fake_replicate.fail_next_prediction()  # failed runs are billed too
    fake_replicate.script_next_prediction(starting_for=0.1, outcome="hang")
    ok = create_raw(rc, Prefer="wait=5")
    failed = create_raw(rc, Prefer="wait=5")
    hung = create_raw(rc)
    time.sleep(0.4)
    rc.predictions.cancel(hung["id"])
    bills = fake_replicate.bills(PRICE)
    assert bills[ok["id"]] == Decimal("2.5") * PRICE
    assert bills[failed["id"]] == Decimal("2.5") * PRICE
    ran = Decimal(str(fake_replicate.prediction_json(hung["id"])["metrics"]["predict_time"]))
    assert Decimal("0.25") < ran < Decimal("1.0")
    assert bills[hung["id"]] == ran * PRICE
    assert fake_replicate.billed(PRICE) == (Decimal("5") + ran) * PRICE


def test_rate_limits_per_endpoint(fake_replicate: FakeReplicate):
    fake_replicate.set_rate_limits(creates_per_minute=60, requests_per_minute=60)
    client = make_client(fake_replicate)
    created = client.predictions.create(version=SDXL_VERSION, input={})
    with pytest.raises(ReplicateError) as info:  # a POST is never retried by the client
        client.predictions.create(version=SDXL_VERSION, input={})
    assert info.value.status == 429
    assert info.value.detail == "Request was throttled. Your rate limit resets in ~1s."
    assert len(fake_replicate.throttled) == 1
    # The other endpoints have a budget of their own: one a second here, then 429.
    # (Plain httpx: the client's transport would retry the 429 by itself.)
    url = f"{fake_replicate.url}/v1/predictions/{created.id}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    responses = [httpx.get(url, headers=auth) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 429]
    assert responses[1].headers["Retry-After"] == "1"
    assert responses[1].json() == {
        "detail": "Request was throttled. Your rate limit resets in ~1s."
    }
    assert [r.route for r in fake_replicate.throttled] == ["create", "get"]
    time.sleep(1.0)  # a token a second
    assert httpx.get(url, headers=auth).status_code == 200
    for _ in range(5):  # downloads are another host's: never limited, never counted
        assert httpx.get(f"{fake_replicate.url}/files/{created.id}.png").status_code == 200
    assert all(r.route != "file" for r in fake_replicate.api_requests)
    assert len(fake_replicate.throttled) == 2


def test_the_client_retries_a_throttled_get_by_itself(fake_replicate: FakeReplicate):
    """Why the worker's limiter sits under the client's RetryTransport: these retries are
    silent, and each one counts against the limit."""
    fake_replicate.set_rate_limits(requests_per_minute=60)
    client = make_client(fake_replicate)
    pid = client.predictions.create(version=SDXL_VERSION, input={}).id
    client.predictions.get(pid)
    started = time.monotonic()
    client.predictions.get(pid)  # 429, Retry-After: 1, then retried and answered
    assert time.monotonic() - started >= 0.9
    assert [r.route for r in fake_replicate.throttled] == ["get"]
    assert fake_replicate.get_count(pid) == 3


def test_list_pages_newest_first_with_inputs(fake_replicate: FakeReplicate):
    fake_replicate.page_size = 2
    client = make_client(fake_replicate)
    for i in range(5):
        client.predictions.create(version=SDXL_VERSION, input={"prompt": str(i)})
    first = client.predictions.list()
    assert [p.input["prompt"] for p in first] == ["4", "3"]
    client.predictions.create(version=SDXL_VERSION, input={"prompt": "late"})
    second = client.predictions.list(first.next)  # a newer one does not shift the pages
    assert [p.input["prompt"] for p in second] == ["2", "1"]
    third = client.predictions.list(second.next)
    assert [p.input["prompt"] for p in third] == ["0"] and third.next is None


def test_duration_range_draws_realistic_predictions():
    with FakeReplicate(api_token=TOKEN, duration_range=(5.0, 10.0), seed=3) as fake:
        client = make_client(fake)
        for _ in range(5):
            client.predictions.create(version=SDXL_VERSION, input={})
        plans = [p.plan for p in fake._predictions.values()]
    assert all(5.0 <= p.duration <= 10.0 for p in plans)
    assert len({p.duration for p in plans}) == 5
    assert all(p.predict_time == pytest.approx(p.duration - (p.starting_for or 0)) for p in plans)
