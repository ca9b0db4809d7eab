"""SDXL on Replicate through the official client (SPEC §4).

A prediction's id is checkpointed the moment it exists, so a redelivered task resumes polling
the same prediction instead of paying for a new one. A prediction that runs past its deadline,
or whose task is abandoned, is cancelled: Replicate bills running time.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from functools import partial
from typing import Any, Protocol

import httpx
import structlog
from PIL import Image, UnidentifiedImageError
from replicate.client import Client as ReplicateClient
from replicate.exceptions import ReplicateError

from worker import constants as c
from worker.crashpoints import crash_point
from worker.errors import (
    ContentRejectedError,
    ImageTimeoutError,
    PermanentError,
    RateLimitedError,
    RefgenError,
    RetryableError,
)
from worker.generation import (
    GeneratedImage,
    GenerationRequest,
    PredictionCheckpoints,
    PredictionRef,
)
from worker.settings import Settings

log = structlog.get_logger(__name__)

_FINISHED = frozenset({"succeeded", "failed", "canceled"})
_SAFETY_WORDS = ("nsfw", "safety", "unsafe", "inappropriate")
_POLL_INTERVAL_S = 0.5


class RateGate(Protocol):
    """Admits a prediction create; shared by every worker (see ``worker.ratelimit``)."""

    def acquire(self, deadline_s: float) -> None: ...

    def back_off(self, seconds: float) -> None: ...


class _NoGate:
    def acquire(self, deadline_s: float) -> None:
        return None

    def back_off(self, seconds: float) -> None:
        return None


class _RetryAfterHook:
    """The client keeps a 429's status and detail but drops its headers; this response hook
    reads ``Retry-After`` at the HTTP layer, per thread, for the call that just failed."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, response: httpx.Response) -> None:
        if response.status_code == 429:
            self._local.value = _parse_retry_after(response.headers.get("retry-after"))

    def take(self) -> float | None:
        value: float | None = getattr(self._local, "value", None)
        self._local.value = None
        return value


class _DefaultTimeoutTransport(httpx.HTTPTransport):
    """``predictions.create`` sends ``timeout=None`` to httpx, which means no timeout at all:
    a hung create would hold its slot forever. This restores a default for such requests."""

    def __init__(self, timeout: httpx.Timeout) -> None:
        super().__init__()
        self._timeout = timeout.as_dict()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        current = request.extensions.get("timeout") or {}
        if all(value is None for value in current.values()):
            request.extensions["timeout"] = self._timeout
        return super().handle_request(request)


def _parse_retry_after(raw: str | None) -> float | None:
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None  # an HTTP date: rare from Replicate, and the 2 s default is safe


class ReplicateImageGenerator:
    def __init__(
        self,
        client: ReplicateClient,
        *,
        model_version: str,
        steps: int,
        checkpoints: PredictionCheckpoints,
        price_per_second: Decimal = c.DEFAULT_HARDWARE_PRICE_PER_S,
        downloader: httpx.Client | None = None,
        retry_after: Callable[[], float | None] = lambda: None,
        gate: RateGate | None = None,
        poll_interval_s: float = _POLL_INTERVAL_S,
        on_rate_limited: Callable[[], None] = lambda: None,
    ) -> None:
        self._client = client
        self._version = model_version
        self._steps = steps
        self._checkpoints = checkpoints
        self._price = price_per_second
        # Outputs live on another host: never send it the API token.
        self._downloader = downloader or httpx.Client(timeout=httpx.Timeout(30, connect=5))
        self._retry_after = retry_after
        self._gate = gate or _NoGate()
        self._poll_interval_s = poll_interval_s
        self._on_rate_limited = on_rate_limited

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        checkpoints: PredictionCheckpoints,
        gate: RateGate | None = None,
        *,
        http_timeout_s: float = 30.0,
        on_rate_limited: Callable[[], None] = lambda: None,
    ) -> ReplicateImageGenerator:
        assert settings.replicate_api_token is not None
        hook = _RetryAfterHook()
        timeout = httpx.Timeout(http_timeout_s, connect=min(5.0, http_timeout_s))
        client = ReplicateClient(
            api_token=settings.replicate_api_token.get_secret_value(),
            timeout=timeout,
            transport=_DefaultTimeoutTransport(timeout),
            event_hooks={"response": [hook]},
        )
        return cls(
            client,
            model_version=settings.model_version,
            steps=settings.inference_steps,
            checkpoints=checkpoints,
            price_per_second=settings.hardware_price_per_second,
            retry_after=hook.take,
            gate=gate,
            on_rate_limited=on_rate_limited,
        )

    def model_input(self, request: GenerationRequest) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": c.IMAGE_SIZE,
            "height": c.IMAGE_SIZE,
            "num_outputs": 1,
            "scheduler": "K_EULER",
            "num_inference_steps": self._steps,
            "guidance_scale": 7.5,
            "apply_watermark": False,
            "seed": request.seed,
        }

    def generate(self, request: GenerationRequest) -> GeneratedImage:
        started = time.monotonic()
        prediction, created = self._resume(request) or self._create(request)
        try:
            prediction = self._wait(prediction, created + request.deadline_s, request)
        except BaseException:
            # Timed out, abandoned (soft time limit, shutdown) or broken: stop the meter.
            self._cancel(prediction.id)
            raise
        png = self._download(prediction)
        cost, fallback = self._cost(prediction)
        return GeneratedImage(
            png=png,
            cost=cost,
            cost_is_fallback=fallback,
            generation_time=round(time.monotonic() - started, 3),
            prediction_id=prediction.id,
        )

    def cancel_in_flight(self, job_id: str, requests: Sequence[GenerationRequest]) -> list[str]:
        cancelled = []
        for request in requests:
            saved = self._checkpoints.saved_prediction(job_id, request.image_key)
            if saved is not None:
                self._cancel(saved.id)
                cancelled.append(saved.id)
        return cancelled

    def _resume(self, request: GenerationRequest) -> tuple[Any, float] | None:
        saved = self._checkpoints.saved_prediction(request.job_id, request.image_key)
        if saved is None:
            return None
        prediction = self._call(lambda: self._client.predictions.get(saved.id))
        if prediction.status in ("failed", "canceled"):
            return None  # this attempt starts afresh
        log.info(
            "prediction_resumed",
            prediction_id=saved.id,
            status=prediction.status,
            image=request.image_key,
        )
        # The deadline runs from the prediction's creation, not from this delivery.
        return prediction, time.monotonic() - (time.time() - saved.created_at)

    def _create(self, request: GenerationRequest) -> tuple[Any, float]:
        self._gate.acquire(request.deadline_s)
        prediction = self._call(
            lambda: self._client.predictions.create(
                version=self._version, input=self.model_input(request)
            )
        )
        self._checkpoints.save_prediction(
            request.job_id, request.image_key, PredictionRef(prediction.id, time.time())
        )
        crash_point("image.after_prediction_created")
        log.info("prediction_created", prediction_id=prediction.id, image=request.image_key)
        return prediction, time.monotonic()

    def _wait(self, prediction: Any, deadline: float, request: GenerationRequest) -> Any:
        while prediction.status not in _FINISHED:
            if time.monotonic() >= deadline:
                raise ImageTimeoutError(f"Timed out after {request.deadline_s:g} s")
            time.sleep(min(self._poll_interval_s, max(0.0, deadline - time.monotonic())))
            prediction = self._call(partial(self._client.predictions.get, prediction.id))
        if prediction.status == "canceled":
            raise RetryableError("The prediction was cancelled on Replicate")
        if prediction.status == "failed":
            error = str(prediction.error or "unknown error")
            if any(word in error.lower() for word in _SAFETY_WORDS):
                raise ContentRejectedError(
                    "Replicate's safety filter flagged the image as NSFW; "
                    "change the description and try again"
                )
            raise PermanentError(f"Replicate could not make the image: {_short(error)}")
        return prediction

    def _download(self, prediction: Any) -> bytes:
        output = prediction.output
        url = output[0] if isinstance(output, list) and output else output
        if not isinstance(url, str):
            raise PermanentError("Replicate returned no image for a finished prediction")
        try:
            response = self._downloader.get(url)
        except httpx.TimeoutException:
            raise RetryableError("Downloading the image from Replicate timed out") from None
        except httpx.TransportError:
            raise RetryableError("Could not download the image from Replicate") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise RetryableError(f"Downloading the image failed (HTTP {response.status_code})")
        if response.status_code >= 400:
            raise PermanentError(
                f"The image is no longer on Replicate (HTTP {response.status_code})"
            )
        check_png(response.content)
        return response.content

    def _cost(self, prediction: Any) -> tuple[Decimal, bool]:
        metrics = prediction.metrics or {}
        predict_time = metrics.get("predict_time")
        if isinstance(predict_time, int | float) and predict_time >= 0:
            return Decimal(str(predict_time)) * self._price, False
        return c.FALLBACK_IMAGE_COST, True

    def _cancel(self, prediction_id: str) -> None:
        try:
            self._client.predictions.cancel(prediction_id)
            log.warning("prediction_cancelled", prediction_id=prediction_id)
        except (ReplicateError, httpx.HTTPError) as exc:
            log.error(
                "prediction_cancel_failed", prediction_id=prediction_id, error=type(exc).__name__
            )

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run one client call; every library error leaves as one of ours."""
        try:
            return fn()
        except ReplicateError as exc:
            raise self._classify(exc) from None
        except httpx.TimeoutException:
            raise RetryableError("Replicate did not answer in time") from None
        except httpx.TransportError:
            raise RetryableError("Could not reach Replicate") from None

    def _classify(self, exc: ReplicateError) -> RefgenError:
        status = exc.status or 0
        if status == 429:
            self._on_rate_limited()
            retry_after = self._retry_after()
            self._gate.back_off(retry_after or c.GENERATION_RETRY_DELAY_S)
            return RateLimitedError("Rate limited by Replicate", retry_after_s=retry_after)
        if status >= 500:
            return RetryableError(f"Replicate is having trouble (HTTP {status})")
        if status in (401, 403):
            return PermanentError(f"Replicate refused the API token (HTTP {status})")
        detail = _short(exc.detail or exc.title or "")
        return PermanentError(f"Replicate refused the request (HTTP {status}): {detail}")


def check_png(data: bytes) -> None:
    """The design asks for 1024×1024 PNGs; anything else is not a reference image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind, size = image.format, image.size
    except (UnidentifiedImageError, OSError):
        raise PermanentError("Replicate returned something that is not an image") from None
    if kind != "PNG" or size != (c.IMAGE_SIZE, c.IMAGE_SIZE):
        raise PermanentError(
            f"Replicate returned a {size[0]}×{size[1]} {kind}; "
            f"a {c.IMAGE_SIZE}×{c.IMAGE_SIZE} PNG was asked for"
        )


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
