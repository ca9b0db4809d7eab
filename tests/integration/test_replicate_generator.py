"""The Replicate generator through the official client against a local Replicate-like server."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

import pytest

from tests.fakes.replicate_server import FakeReplicate
from worker import constants as c
from worker.errors import ContentRejectedError, ImageTimeoutError, PermanentError, RetryableError
from worker.generation import GenerationRequest, PredictionRef
from worker.generation.replicate import ReplicateImageGenerator
from worker.settings import Settings

pytestmark = pytest.mark.integration


class MemoryCheckpoints:
    def __init__(self) -> None:
        self.saved: dict[tuple[str, str], PredictionRef] = {}

    def saved_prediction(self, job_id: str, image_key: str) -> PredictionRef | None:
        return self.saved.get((job_id, image_key))

    def save_prediction(self, job_id: str, image_key: str, ref: PredictionRef) -> None:
        self.saved[(job_id, image_key)] = ref


@pytest.fixture
def token() -> str:
    return "r8_" + secrets.token_hex(16)  # made at run time, never committed


@pytest.fixture
def fake(token: str):
    with FakeReplicate(api_token=token) as server:
        yield server


@pytest.fixture
def checkpoints() -> MemoryCheckpoints:
    return MemoryCheckpoints()


@pytest.fixture
def generator(fake, token, checkpoints, monkeypatch) -> ReplicateImageGenerator:
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)  # the client's own variable
    settings = Settings(
        replicate_api_token=token, environment="production", storage_backend="local"
    )
    built = ReplicateImageGenerator.from_settings(settings, checkpoints)
    built._poll_interval_s = 0.05
    return built


def request(deadline_s: float = 10, prompt: str = "a neon street") -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1",
        image_id="street",
        image_key="scene_street",
        prompt=prompt,
        negative_prompt=c.NEGATIVE_PROMPT,
        seed=42,
        deadline_s=deadline_s,
    )


def test_sends_the_exact_version_and_inputs(generator, fake) -> None:
    image = generator.generate(request())
    assert len(fake.creates) == 1
    call = fake.creates[0]
    assert call.path == "/v1/predictions"
    assert call.version_field == c.SDXL_VERSION
    assert call.input == {
        "prompt": "a neon street",
        "negative_prompt": c.NEGATIVE_PROMPT,
        "width": 1024,
        "height": 1024,
        "num_outputs": 1,
        "scheduler": "K_EULER",
        "num_inference_steps": 40,
        "guidance_scale": 7.5,
        "apply_watermark": False,
        "seed": 42,
    }
    assert image.png.startswith(b"\x89PNG")
    assert image.cost == Decimal("2.5") * Decimal("0.000725")
    assert not image.cost_is_fallback
    assert image.prediction_id == call.prediction_id


def test_development_uses_25_steps(fake, token, checkpoints, monkeypatch) -> None:
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)
    settings = Settings(
        replicate_api_token=token, environment="development", storage_backend="local"
    )
    ReplicateImageGenerator.from_settings(settings, checkpoints).generate(request())
    assert fake.creates[0].input["num_inference_steps"] == 25


def test_missing_predict_time_falls_back_to_flat_price(generator, fake) -> None:
    fake.script_next_prediction(predict_time=None)
    image = generator.generate(request())
    assert (image.cost, image.cost_is_fallback) == (Decimal("0.005"), True)


def test_429_on_create_carries_retry_after(generator, fake) -> None:
    fake.throttle_next_creates(retry_after=3)
    with pytest.raises(RetryableError) as info:
        generator.generate(request())
    assert info.value.retry_after_s == 3.0
    assert info.value.reason == "Rate limited by Replicate"


def test_5xx_is_retryable_and_401_is_not(generator, fake) -> None:
    fake.fail_next_creates(status=500)
    with pytest.raises(RetryableError, match="HTTP 500"):
        generator.generate(request())
    fake.api_token = "r8_" + secrets.token_hex(16)
    with pytest.raises(PermanentError, match="HTTP 401") as info:
        generator.generate(request())
    assert not isinstance(info.value, RetryableError)


def test_nsfw_failure_is_a_readable_content_rejection(generator, fake) -> None:
    fake.fail_next_prediction()
    with pytest.raises(ContentRejectedError, match="NSFW"):
        generator.generate(request())


def test_deadline_cancels_the_prediction(generator, fake) -> None:
    fake.hang_next_prediction()
    started = time.monotonic()
    with pytest.raises(ImageTimeoutError, match=r"Timed out after 0\.5 s"):
        generator.generate(request(deadline_s=0.5))
    assert time.monotonic() - started < 5
    assert fake.cancels == [fake.creates[0].prediction_id]


def test_a_saved_prediction_is_resumed_not_created_again(generator, fake, checkpoints) -> None:
    fake.script_next_prediction(duration=1.0)
    first = fake_create(generator, fake)
    checkpoints.save_prediction("job-1", "scene_street", PredictionRef(first, time.time()))
    image = generator.generate(request())
    assert fake.create_count == 1
    assert image.prediction_id == first


def test_a_failed_saved_prediction_is_replaced(generator, fake, checkpoints) -> None:
    fake.fail_next_prediction(error="CUDA out of memory")
    first = fake_create(generator, fake)
    time.sleep(0.5)
    checkpoints.save_prediction("job-1", "scene_street", PredictionRef(first, time.time()))
    image = generator.generate(request())
    assert fake.create_count == 2 and image.prediction_id != first


def test_wrong_output_size_is_refused(fake, token, checkpoints, monkeypatch) -> None:
    from tests.fakes.replicate_server import make_png

    fake.script_next_prediction(image_bytes=make_png(512, 512))
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)
    settings = Settings(replicate_api_token=token, storage_backend="local")
    with pytest.raises(PermanentError, match="512×512"):
        ReplicateImageGenerator.from_settings(settings, checkpoints).generate(request())


def test_a_hung_create_times_out_instead_of_blocking(fake, token, checkpoints, monkeypatch) -> None:
    """The client sends create with timeout=None; the worker restores one."""
    monkeypatch.setenv("REPLICATE_BASE_URL", fake.url)
    settings = Settings(replicate_api_token=token, storage_backend="local")
    generator = ReplicateImageGenerator.from_settings(settings, checkpoints, http_timeout_s=1)
    fake.delay_next("create", seconds=8)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="did not answer in time"):
        generator.generate(request())
    assert time.monotonic() - started < 6


def test_the_token_never_reaches_the_output_host(generator, fake, token) -> None:
    generator.generate(request())
    downloads = fake.requests_for(route="file")
    assert downloads
    assert all("authorization" not in r.headers for r in downloads)


def fake_create(generator: ReplicateImageGenerator, fake: FakeReplicate) -> str:
    prediction = generator._client.predictions.create(version=c.SDXL_VERSION, input={"prompt": "x"})
    return str(prediction.id)
