"""The Supabase store through storage3 against a local Supabase-Storage-like server."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta

import fakeredis
import httpx
import pytest

from tests.fakes.replicate_server import make_png
from tests.fakes.supabase_server import FakeSupabaseStorage
from worker import constants as c
from worker.errors import PermanentError, RetryableError
from worker.retention import Retention
from worker.retry import storage_call
from worker.settings import Settings
from worker.storage.supabase import SupabaseImageStore, storage_url

pytestmark = pytest.mark.integration
PNG = make_png(1024, 1024)


@pytest.fixture
def key() -> str:
    return "sb-" + secrets.token_hex(16)


@pytest.fixture
def fake(key: str):
    with FakeSupabaseStorage(service_key=key) as server:
        yield server


@pytest.fixture
def store(fake, key) -> SupabaseImageStore:
    settings = Settings(supabase_url=fake.url, supabase_service_key=key, generator_backend="local")
    built = SupabaseImageStore.from_settings(settings)
    built.ensure_bucket()
    return built


def test_storage_url_follows_hosted_layout() -> None:
    assert storage_url("https://x.supabase.co") == "https://x.supabase.co/storage/v1/"
    assert storage_url("https://x.supabase.co/storage/v1/") == "https://x.supabase.co/storage/v1/"


def test_bucket_is_private_5_mb_png_only(store, fake) -> None:
    bucket = fake.buckets[c.DEFAULT_BUCKET]
    assert bucket.public is False
    assert bucket.file_size_limit == c.MAX_IMAGE_BYTES
    assert bucket.allowed_mime_types == ["image/png"]
    store.ensure_bucket()  # a second worker: no error, still one bucket
    assert list(fake.buckets) == [c.DEFAULT_BUCKET]


def test_upload_stores_raw_png_with_its_content_type_and_upsert(store, fake) -> None:
    store.put_png("job-1/scene_street.png", PNG)
    stored = fake.get_object(c.DEFAULT_BUCKET, "job-1/scene_street.png")
    assert stored is not None
    assert stored.content_type == "image/png"
    assert stored.data == PNG  # the image itself, not a multipart envelope
    upload = fake.requests_for(route="upload")[-1]
    assert upload.headers["x-upsert"] == "true"


def test_reupload_of_the_same_key_succeeds(store, fake) -> None:
    store.put_png("job-1/scene_street.png", b"\x89PNG first")
    store.put_png("job-1/scene_street.png", PNG)
    assert fake.get_object(c.DEFAULT_BUCKET, "job-1/scene_street.png").data == PNG


def test_two_5xx_then_success_is_stored(store, fake) -> None:
    fake.fail_next_uploads(status=503, times=2)
    storage_call(lambda: store.put_png("job-1/scene_a.png", PNG), initial_wait_s=0.05)
    assert fake.get_object(c.DEFAULT_BUCKET, "job-1/scene_a.png").data == PNG
    assert len(fake.requests_for(route="upload")) == 3


def test_three_5xx_give_up_as_retryable(store, fake) -> None:
    fake.fail_next_uploads(status=500, times=3)
    with pytest.raises(RetryableError):
        storage_call(lambda: store.put_png("job-1/scene_a.png", PNG), initial_wait_s=0.05)


def test_too_large_is_permanent_with_a_clear_reason(store, fake) -> None:
    fake.reject_next_uploads_too_large()
    with pytest.raises(PermanentError, match="too large") as info:
        storage_call(lambda: store.put_png("job-1/scene_a.png", PNG))
    assert not isinstance(info.value, RetryableError)
    assert len(fake.requests_for(route="upload")) == 1  # not retried


def test_wrong_key_is_a_permanent_error_without_the_key(store, fake, key) -> None:
    fake.accepted_keys = {"another-key-entirely"}
    with pytest.raises(PermanentError) as info:
        store.put_png("job-1/scene_a.png", PNG)
    assert key not in info.value.reason


def test_signed_url_downloads_the_same_bytes_for_14_days(store, fake) -> None:
    store.put_png("job-1/scene_a.png", PNG)
    url = store.signed_url("job-1/scene_a.png")
    assert url.startswith(fake.url + "/storage/v1/object/sign/")
    assert httpx.get(url).content == PNG
    record = fake.signed_urls[-1]
    assert record.expires_in == 1_209_600
    assert record.expires_at - record.issued_at == 14 * 24 * 3600
    fake.advance_clock(14 * 24 * 3600 + 5)
    assert httpx.get(url).status_code != 200


def test_retention_removes_old_objects_only(store, fake) -> None:
    now = time.time()
    for job in ("old-success", "recent-success", "old-failure", "orphan", "recent-orphan"):
        store.put_png(f"{job}/scene_a.png", PNG)
    long_ago = datetime.now(UTC) - timedelta(days=30)
    fake.set_object_times(c.DEFAULT_BUCKET, "orphan/scene_a.png", updated_at=long_ago)
    retention = Retention(
        fakeredis.FakeRedis(decode_responses=True), store, success_days=14, failure_days=7
    )
    retention.schedule("old-success", succeeded=True, finished_at=now - 15 * 86_400)
    retention.schedule("recent-success", succeeded=True, finished_at=now - 10 * 86_400)
    retention.schedule("old-failure", succeeded=False, finished_at=now - 8 * 86_400)

    report = retention.purge()

    assert sorted(report.purged_jobs) == ["old-failure", "old-success", "orphan"]
    left = sorted(o.name for o in fake.objects(c.DEFAULT_BUCKET))
    assert left == ["recent-orphan/scene_a.png", "recent-success/scene_a.png"]
    assert retention.purge().purged_jobs == []  # nothing due twice


def test_the_service_key_never_follows_a_redirect_to_another_origin(fake, key) -> None:
    """httpx drops only Authorization on a cross-origin redirect: a client that followed one
    handed the service-role key (apiKey) to whatever server the redirect named."""
    from tests.fakes._http import Fault

    with FakeSupabaseStorage(service_key="sb-" + secrets.token_hex(16)) as elsewhere:
        settings = Settings(
            supabase_url=fake.url, supabase_service_key=key, generator_backend="local"
        )
        store = SupabaseImageStore.from_settings(settings)
        for status in (301, 302, 307, 308):
            fake.inject(
                "*",
                Fault(
                    status=status,
                    body=b"",
                    headers={"Location": elsewhere.url + "/storage/v1/object/x"},
                ),
                times=3,
            )
            for call in (
                lambda: store.put_png("job-1/scene_street.png", PNG),
                lambda: store.exists("job-1/scene_street.png"),
                lambda: store.signed_url("job-1/scene_street.png"),
            ):
                with pytest.raises(PermanentError) as caught:
                    call()
                assert "redirect" in caught.value.reason and key not in caught.value.reason
        assert elsewhere.requests == []  # nothing, let alone the key, reached the other origin


def test_the_anon_key_as_service_key_is_refused_never_reported_as_a_missing_bucket() -> None:
    """Against the real server, the anon key hides every bucket (row-level security) and is
    refused every write: each image failed as "The storage bucket does not exist", and the
    retention purge listed nothing and deleted nothing. Its role claim says what it is: the
    worker refuses it at start, and a refusal is never called a missing bucket."""
    import jwt

    from worker.errors import BucketMissingError, ConfigurationError, StoreRefusedError

    signing = secrets.token_hex(32)
    service = jwt.encode({"role": "service_role", "iss": "supabase"}, signing, algorithm="HS256")
    anon = jwt.encode({"role": "anon", "iss": "supabase"}, signing, algorithm="HS256")
    with FakeSupabaseStorage(service_key=service, anon_key=anon) as fake:
        fake.create_bucket(c.DEFAULT_BUCKET)

        def settings(key: str) -> Settings:
            return Settings(
                supabase_url=fake.url,
                supabase_service_key=key,
                storage_backend="supabase",
                generator_backend="local",
            )

        settings(service).check_backends()
        with pytest.raises(ConfigurationError) as refused:
            settings(anon).check_backends()
        assert "role 'anon', not the service_role key" in refused.value.reason
        assert anon not in refused.value.reason

        # Past the start-up check (a key whose role changed under us): refused, not missing.
        store = SupabaseImageStore.from_settings(settings(service))
        anon_store = _store_with_key(fake.url, anon)
        with pytest.raises(StoreRefusedError) as caught:
            anon_store.ensure_bucket()
        assert not isinstance(caught.value, BucketMissingError)
        assert caught.value.reason == "Supabase refused the service key"
        with pytest.raises(StoreRefusedError) as caught:
            anon_store.put_png("job-1/scene_street.png", PNG)
        assert not isinstance(caught.value, BucketMissingError)
        store.put_png("job-1/scene_street.png", PNG)  # the service key still works
        assert [o.path for o in store.list_prefix("job-1")] == ["job-1/scene_street.png"]


def _store_with_key(url: str, key: str) -> SupabaseImageStore:
    """A store built as from_settings builds it, without the settings' role check."""
    from storage3 import SyncStorageClient

    headers = {"apiKey": key, "Authorization": f"Bearer {key}"}
    client = SyncStorageClient(storage_url(url), headers, http_client=httpx.Client(headers=headers))
    return SupabaseImageStore(client, c.DEFAULT_BUCKET)
