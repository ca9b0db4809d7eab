from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from PIL import Image

from worker.errors import ContentRejectedError, ImageTimeoutError, PermanentError, RetryableError
from worker.generation import GenerationRequest
from worker.generation.local import LocalImageGenerator, render_png
from worker.storage.local import LocalImageStore


def request(
    image_id: str = "street", attempt: int = 0, deadline_s: float = 120
) -> GenerationRequest:
    return GenerationRequest(
        job_id="j",
        image_id=image_id,
        image_key=f"scene_{image_id}",
        prompt=f"a {image_id}",
        negative_prompt="n",
        seed=1,
        palette=["#112233", "#AABBCC"],
        attempt=attempt,
        deadline_s=deadline_s,
    )


def test_render_is_a_deterministic_1024_png() -> None:
    palette = ("#112233", "#AABBCC")
    first = render_png("a street", palette)
    assert first == render_png.__wrapped__("a street", palette)  # drawn again, not cached
    assert first != render_png("a rooftop", palette)
    image = Image.open(io.BytesIO(first))
    assert (image.format, image.size) == ("PNG", (1024, 1024))
    assert image.getpixel((0, 0))[:3] != image.getpixel((0, 1023))[:3]  # palette gradient


def test_generator_failure_knobs() -> None:
    generator = LocalImageGenerator(
        latency_s=0, fail_ids={"bad"}, flaky_ids={"flaky"}, reject_ids={"nsfw"}
    )
    with pytest.raises(RetryableError):
        generator.generate(request("bad", attempt=1))
    with pytest.raises(RetryableError):
        generator.generate(request("flaky", attempt=0))
    assert generator.generate(request("flaky", attempt=1)).png
    with pytest.raises(ContentRejectedError):
        generator.generate(request("nsfw"))


def test_generator_honours_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr("worker.generation.local.time.sleep", slept.append)
    generator = LocalImageGenerator(latency_s=5)
    with pytest.raises(ImageTimeoutError, match=r"Timed out after 0\.2 s"):
        generator.generate(request(deadline_s=0.2))
    assert slept == [0.2]  # it waited out the deadline, not the 5 s latency


def test_store_round_trip_and_upsert(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    store.ensure_bucket()
    store.put_png("job/scene_a.png", b"one")
    store.put_png("job/scene_a.png", b"two")
    assert store.read("job/scene_a.png") == b"two"
    assert [o.path for o in store.list_prefix("job")] == ["job/scene_a.png"]
    store.delete(["job/scene_a.png"])
    assert not store.exists("job/scene_a.png")


def test_store_refuses_paths_outside_the_bucket(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path / "root")
    with pytest.raises(PermanentError):
        store.put_png("../../escape.png", b"x")
    assert not (tmp_path / "escape.png").exists()


def test_store_refuses_images_over_5_mb(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="too large"):
        LocalImageStore(tmp_path).put_png("j/scene_a.png", b"x" * (5 * 1024 * 1024 + 1))


def test_signed_urls_open_locally_and_expire(tmp_path: Path) -> None:
    store = LocalImageStore(tmp_path)
    store.put_png("job/scene_a.png", b"png")
    url = store.signed_url("job/scene_a.png", expires_in_s=60)
    assert url.startswith("file://") and "signature=" in url
    expires = int(url.split("expires=")[1].split("&")[0])
    signature = url.split("signature=")[1]
    assert store.verify("job/scene_a.png", expires, signature)
    assert not store.verify("job/scene_b.png", expires, signature)
    assert not store.verify(
        "job/scene_a.png", int(time.time()) - 1, store.sign("job/scene_a.png", int(time.time()) - 1)
    )
    # Another store on the same directory (another worker) signs with the same key.
    assert LocalImageStore(tmp_path).verify("job/scene_a.png", expires, signature)
    # A stranger's signature is a no, whatever it holds.
    for forged in ("", "é", "\udcff", "ÿ" * 64, signature[:-1] + "é", "x" * 10_000):
        assert not store.verify("job/scene_a.png", expires, forged)
    assert not store.verify("job/é.png", expires, signature)
