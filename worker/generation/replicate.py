"""SDXL on Replicate through the official client (SPEC §4).

One API request per image in the common case: the create is sent in sync mode
(``Prefer: wait=N``), so Replicate answers with the finished prediction; only an answer that
is not final is polled, at intervals that grow. Every create carries ``Cancel-After``, the time
left in the attempt, so Replicate itself ends a prediction whose worker died (``aborted`` if
it never started: not billed; ``canceled`` once running: billed for the time run). A prediction
the worker abandons (its own deadline, an exception, a shutdown) is still cancelled explicitly.

Crash safety: an intent is checkpointed before each create and the id as soon as it is known,
so a redelivered task resumes that prediction, or finds it on Replicate by its input when the
worker died while the create was held open, instead of paying for a second one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import structlog
from PIL import Image, UnidentifiedImageError
from replicate.client import Client as ReplicateClient

from worker import constants as c
from worker import tracing
from worker.crashpoints import crash_point
from worker.errors import (
    CancelledError,
    ContentRejectedError,
    ImageTimeoutError,
    PermanentError,
    RateLimitedError,
    RefgenError,
    RetryableError,
)
from worker.generation import (
    Bill,
    GeneratedImage,
    GenerationRequest,
    PredictionCheckpoint,
    PredictionCheckpoints,
)
from worker.generation.replicate_api import (
    RemotePrediction,
    ReplicateApi,
    cancel_after_s,
    short,
    sync_wait_s,
)
from worker.ratelimit import CREATE, BudgetTransport, RequestBudget, Unlimited
from worker.settings import Settings

log = structlog.get_logger(__name__)

_SAFETY_WORDS = ("nsfw", "safety", "unsafe", "inappropriate")
# Polling, when the sync answer was not final: 0.25 s, doubling, at most 2 s.
_POLL_FIRST_S = 0.25
_POLL_MAX_S = 2.0
# Past its deadline a prediction gets this long to show Replicate's own verdict (aborted or
# canceled, with its bill) before the worker cancels it itself.
_DEADLINE_GRACE_S = 1.0
# After an explicit cancel, how long to read the prediction back for its final run time.
_SETTLE_S = 1.0
# Looking for a prediction whose create answer was lost: the listing (pages of 100, newest
# first) is read back to the intent's time less this margin, for Redis's clock and
# Replicate's may differ; the page cap only bounds a listing that never gets there.
_CLOCK_SKEW_S = 30.0
_LIST_MAX_PAGES = 200
# A create younger than this may still be on its way when a job's predictions are cancelled.
_IN_TRANSIT_S = 5.0
# A create with less time than this left is not worth its request.
_TOO_LATE_S = 0.5
# Requests made after a deadline (reading a verdict, cancelling) still get this long.
_AFTERMATH_S = 10.0
# The worker's start waits at most this long for its connections to Replicate (warm()).
_WARM_WITHIN_S = 3.0


@dataclass(frozen=True)
class _Run:
    prediction: RemotePrediction
    deadline: float  # time.monotonic() when the attempt's time is up


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
        budget: RequestBudget | None = None,
        http_timeout_s: float = 30.0,
        poll_first_s: float = _POLL_FIRST_S,
    ) -> None:
        self._api = ReplicateApi(client, http_timeout_s=http_timeout_s)
        self._version = model_version
        self._steps = steps
        self._checkpoints = checkpoints
        self._price = price_per_second
        # Outputs live on another host: never send it the API token.
        self._downloader = downloader or httpx.Client(timeout=httpx.Timeout(30, connect=5))
        self._budget = budget or Unlimited()
        self._poll_first_s = poll_first_s

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        checkpoints: PredictionCheckpoints,
        budget: RequestBudget | None = None,
        *,
        http_timeout_s: float = 30.0,
        on_rate_limited: Callable[[], None] = lambda: None,
    ) -> ReplicateImageGenerator:
        assert settings.replicate_api_token is not None
        budget = budget or Unlimited()
        transport = BudgetTransport(httpx.HTTPTransport(), budget, on_throttled=on_rate_limited)
        client = ReplicateClient(
            api_token=settings.replicate_api_token.get_secret_value(),
            timeout=httpx.Timeout(http_timeout_s, connect=min(5.0, http_timeout_s)),
            transport=transport,
        )
        return cls(
            client,
            model_version=settings.model_version,
            steps=settings.inference_steps,
            checkpoints=checkpoints,
            price_per_second=settings.hardware_price_per_second,
            budget=budget,
            http_timeout_s=http_timeout_s,
        )

    def warm(self, connections: int) -> None:
        answered = self._api.open_connections(connections, within_s=_WARM_WITHIN_S)
        if answered < connections:
            log.warning(
                "replicate_warmup_incomplete",
                answered=answered,
                connections=connections,
                action="the first images open their own connections",
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

    # ------------------------------------------------------------------ one image
    def generate(self, request: GenerationRequest) -> GeneratedImage:
        started = time.monotonic()
        run = self._start(request)
        try:
            with tracing.span("refgen.replicate.wait", polled=not run.prediction.finished):
                prediction = self._await(run, request)
        except BaseException as exc:
            # Timed out, abandoned (soft time limit, shutdown) or broken: stop the meter.
            bill = self._abandon(run.prediction.id)
            if isinstance(exc, RefgenError):
                exc.billed = bill
            raise
        bill = self._bill(prediction)
        try:
            png = self._conclude(prediction, run, request)
        except RefgenError as exc:
            exc.billed = bill
            raise
        return GeneratedImage(
            png=png,
            cost=bill.cost,
            cost_is_fallback=self._is_fallback(prediction),
            generation_time=round(time.monotonic() - started, 3),
            prediction_id=prediction.id,
        )

    def _start(self, request: GenerationRequest) -> _Run:
        saved = self._checkpoints.load(request.job_id)
        mine = [cp for cp in saved if cp.image_key == request.image_key]
        current = next((cp for cp in mine if cp.attempt == request.attempt), None)
        deadline = time.monotonic() + request.deadline_s - (current.age_s if current else 0.0)
        if current is not None and current.prediction_id is not None:
            prediction = self._api.get(current.prediction_id, until=_after(deadline))
            log.info(
                "prediction_resumed",
                prediction_id=prediction.id,
                status=prediction.status,
                image=request.image_key,
            )
            return _Run(prediction, deadline)
        adopted = self._adopt_lost(request, mine, deadline)
        if adopted is not None:
            return adopted
        reused = self._earlier_success(request, mine)
        return reused if reused is not None else self._create(request)

    def _adopt_lost(
        self, request: GenerationRequest, mine: list[PredictionCheckpoint], deadline: float
    ) -> _Run | None:
        """A create whose answer was lost (a worker that died while it was held open, an
        edge's 502, a reset, a read timeout) left an intent without an id, this attempt's or
        an earlier one's: the prediction it made is found on Replicate by its input, searched
        back to the intent's time, and taken instead of paying for another."""
        lost = [cp for cp in mine if cp.prediction_id is None and cp.attempt <= request.attempt]
        if not lost:
            return None
        known = {cp.prediction_id for cp in mine if cp.prediction_id is not None}
        matches = self._match([(request, cp) for cp in lost], exclude=known, until=_after(deadline))
        if not matches:
            return None
        _, owner, prediction = matches[0]  # the earliest lost intent's
        self._checkpoints.save_prediction(
            request.job_id, request.image_key, owner.attempt, prediction.id
        )
        log.info(
            "prediction_adopted",
            prediction_id=prediction.id,
            status=prediction.status,
            image=request.image_key,
            lost_attempt=owner.attempt + 1,
        )
        return _Run(prediction, deadline)

    def _earlier_success(
        self, request: GenerationRequest, mine: list[PredictionCheckpoint]
    ) -> _Run | None:
        """An earlier attempt's prediction that succeeded (the attempt failed after it, at its
        upload), or that still runs (adopted after its answer was lost, by a delivery that
        died since): its output is on Replicate for an hour, so this attempt takes it instead
        of paying for the same image again."""
        deadline = time.monotonic() + request.deadline_s
        for earlier in reversed(mine):
            if earlier.attempt >= request.attempt or earlier.prediction_id is None:
                continue
            prediction = self._api.get(earlier.prediction_id, until=_after(deadline))
            if prediction.status == "succeeded" or not prediction.finished:
                log.info("prediction_reused", prediction_id=prediction.id, image=request.image_key)
                return _Run(prediction, deadline)
        return None

    def _create(self, request: GenerationRequest) -> _Run:
        deadline = time.monotonic() + request.deadline_s
        # Admitted here rather than in the transport, so the intent is written the moment
        # before the create leaves, not before a wait for the budget.
        with tracing.span("refgen.replicate.admission"):
            self._budget.admit(CREATE, deadline)
        remaining = deadline - time.monotonic()
        if remaining < _TOO_LATE_S:
            raise ImageTimeoutError(f"Timed out after {request.deadline_s:g} s")
        intent = self._checkpoints.save_intent(request.job_id, request.image_key, request.attempt)
        if intent is None:
            raise CancelledError("Cancelled: the job's images were cancelled before this one")
        with tracing.span("refgen.replicate.create") as traced:
            try:
                prediction = self._api.create(
                    self._version,
                    self.model_input(request),
                    wait_s=sync_wait_s(remaining),
                    cancel_after_s=cancel_after_s(remaining),
                    until=deadline,
                    admitted=True,
                )
            except (RateLimitedError, PermanentError):
                # Replicate itself answered no (429, 4xx): nothing was made, nothing to look
                # for. Any other failure (an edge's 502, a reset, a timeout) may have made one:
                # the intent stays, for the next attempt to find it.
                self._checkpoints.drop_intent(request.job_id, request.image_key, request.attempt)
                raise
            traced.set_attribute("refgen.prediction_id", prediction.id)
        # The hardest instant to die at: Replicate has the prediction, Redis only the intent.
        crash_point("image.after_prediction_created")
        self._checkpoints.save_prediction(
            request.job_id, request.image_key, request.attempt, prediction.id
        )
        log.info(
            "prediction_created",
            prediction_id=prediction.id,
            status=prediction.status,
            image=request.image_key,
        )
        return _Run(prediction, deadline)

    def _await(self, run: _Run, request: GenerationRequest) -> RemotePrediction:
        """Poll until the prediction ends, the first poll soon, then less and less often;
        never sleeping past the deadline, then briefly past it for Replicate's verdict."""
        prediction, interval = run.prediction, self._poll_first_s
        while not prediction.finished:
            now = time.monotonic()
            if now >= run.deadline + _DEADLINE_GRACE_S:
                raise ImageTimeoutError(f"Timed out after {request.deadline_s:g} s")
            wake = run.deadline if now < run.deadline else run.deadline + _DEADLINE_GRACE_S
            time.sleep(max(0.0, min(interval, wake - now)))
            interval = min(interval * 2, _POLL_MAX_S)
            prediction = self._api.get(prediction.id, until=_after(run.deadline))
        return prediction

    def _conclude(
        self, prediction: RemotePrediction, run: _Run, request: GenerationRequest
    ) -> bytes:
        if prediction.status == "succeeded":
            with tracing.span("refgen.replicate.download"):
                return self._download(prediction)
        if prediction.status == "aborted":
            raise ImageTimeoutError(
                f"Timed out after {request.deadline_s:g} s before Replicate started the image "
                "(not billed)"
            )
        if prediction.status == "canceled":
            if time.monotonic() >= run.deadline - _DEADLINE_GRACE_S:
                raise ImageTimeoutError(f"Timed out after {request.deadline_s:g} s")
            raise CancelledError("Cancelled: the prediction was cancelled on Replicate")
        error = prediction.error or "unknown error"
        if any(word in error.lower() for word in _SAFETY_WORDS):
            raise ContentRejectedError(
                "Replicate's safety filter flagged the image as NSFW; "
                "change the description and try again"
            )
        raise PermanentError(f"Replicate could not make the image: {short(error)}")

    # ------------------------------------------------------------------ money
    def _bill(self, prediction: RemotePrediction) -> Bill:
        if prediction.status == "aborted" or (
            prediction.status == "canceled" and not prediction.started
        ):
            return Bill(prediction.id, Decimal(0))  # it never ran
        if prediction.predict_time is not None:
            return Bill(prediction.id, Decimal(str(prediction.predict_time)) * self._price)
        return Bill(prediction.id, c.FALLBACK_IMAGE_COST)

    def _is_fallback(self, prediction: RemotePrediction) -> bool:
        return prediction.predict_time is None

    def _abandon(self, prediction_id: str) -> Bill:
        """Cancel a prediction the worker no longer waits for, and read back what it cost."""
        until = time.monotonic() + _AFTERMATH_S
        try:
            prediction = self._api.cancel(prediction_id, until=until)
            log.warning("prediction_cancelled", prediction_id=prediction_id)
            settle = time.monotonic() + _SETTLE_S
            while not prediction.finished and time.monotonic() < settle:
                time.sleep(0.25)
                prediction = self._api.get(prediction_id, until=until)
        except RefgenError as exc:
            log.error("prediction_cancel_failed", prediction_id=prediction_id, reason=exc.reason)
            return Bill(prediction_id, c.FALLBACK_IMAGE_COST)
        if not prediction.finished:
            return Bill(prediction_id, c.FALLBACK_IMAGE_COST)
        return self._bill(prediction)

    # ------------------------------------------------------------------ a doomed job
    def cancel_in_flight(self, job_id: str, requests: Sequence[GenerationRequest]) -> list[str]:
        """Cancel every still-running prediction of these images and create no more for the
        job. Creates whose answer has not come back yet are found on Replicate by input."""
        self._checkpoints.mark_cancelled(job_id)
        wanted = {r.image_key: r for r in requests}
        saved = self._checkpoints.load(job_id)
        latest: dict[str, PredictionCheckpoint] = {}
        for cp in saved:  # sorted by attempt: the last one wins
            if cp.image_key in wanted:
                latest[cp.image_key] = cp
        until = time.monotonic() + _AFTERMATH_S
        cancelled: list[str] = []
        for cp in latest.values():
            if cp.prediction_id is not None and self._cancel_quietly(cp.prediction_id, until):
                cancelled.append(cp.prediction_id)
        known = {cp.prediction_id for cp in saved if cp.prediction_id is not None}
        pending = [(wanted[k], cp) for k, cp in latest.items() if cp.prediction_id is None]
        for pass_number in range(2):
            if not pending:
                break
            if pass_number:
                # A create sent just before the cancellation may not have reached Replicate.
                pending = [(r, cp) for r, cp in pending if cp.age_s < _IN_TRANSIT_S]
                time.sleep(1.0)
            found = self._find(pending, exclude=known, until=until)
            for prediction in found.values():
                if not prediction.finished and self._cancel_quietly(prediction.id, until):
                    cancelled.append(prediction.id)
            pending = [(r, cp) for r, cp in pending if r.image_key not in found]
        log.warning("job_predictions_cancelled", job_id=job_id, cancelled=len(cancelled))
        return cancelled

    def _cancel_quietly(self, prediction_id: str, until: float) -> bool:
        try:
            prediction = self._api.cancel(prediction_id, until=until)
        except RefgenError as exc:
            log.error("prediction_cancel_failed", prediction_id=prediction_id, reason=exc.reason)
            return False
        return prediction.status == "canceled"

    # ------------------------------------------------------------------ a lost create's bill
    def sweep_lost(
        self, job_id: str, requests: Sequence[GenerationRequest]
    ) -> list[tuple[str, Bill]]:
        """At the job's end: any prediction made by a create whose answer was lost and that no
        attempt adopted (it reached Replicate only after the retry had searched) is cancelled
        if it still runs, and its bill returned, (image key, bill), to be charged."""
        wanted = {r.image_key: r for r in requests}
        saved = self._checkpoints.load(job_id)
        lost = [
            (wanted[cp.image_key], cp)
            for cp in saved
            if cp.prediction_id is None and cp.image_key in wanted
        ]
        if not lost:
            return []
        known = {cp.prediction_id for cp in saved if cp.prediction_id is not None}
        until = time.monotonic() + _AFTERMATH_S
        try:
            matches = self._match(lost, exclude=known, until=until)
        except RefgenError as exc:
            log.error("lost_predictions_not_searched", job_id=job_id, reason=exc.reason)
            return []
        bills: list[tuple[str, Bill]] = []
        for request, cp, prediction in matches:
            self._checkpoints.save_prediction(job_id, cp.image_key, cp.attempt, prediction.id)
            bill = self._bill(prediction) if prediction.finished else self._abandon(prediction.id)
            log.warning(
                "lost_prediction_swept",
                job_id=job_id,
                image=request.image_key,
                prediction_id=prediction.id,
                status=prediction.status,
            )
            bills.append((request.image_key, bill))
        return bills

    # ------------------------------------------------------------------ finding by input
    def _find(
        self,
        pending: Sequence[tuple[GenerationRequest, PredictionCheckpoint]],
        *,
        exclude: set[str],
        until: float,
    ) -> dict[str, RemotePrediction]:
        """The prediction each image's earliest intent created (see ``_match``)."""
        found: dict[str, RemotePrediction] = {}
        for request, _, prediction in self._match(pending, exclude=exclude, until=until):
            found.setdefault(request.image_key, prediction)
        return found

    def _match(
        self,
        pending: Sequence[tuple[GenerationRequest, PredictionCheckpoint]],
        *,
        exclude: set[str],
        until: float,
    ) -> list[tuple[GenerationRequest, PredictionCheckpoint, RemotePrediction]]:
        """The prediction each intent created, found in the account's predictions by its
        input (prompt, negative prompt, seed): the listing is read, newest first, back to the
        earliest intent's time less a margin for the clocks' skew (Redis's against
        Replicate's), however many pages that takes. Each intent, earliest first, takes the
        earliest prediction created after it that no other intent took; earliest first."""
        if not pending:
            return []
        wanted: dict[
            tuple[str, str, str] | None, list[tuple[GenerationRequest, PredictionCheckpoint]]
        ] = {}
        for request, cp in sorted(pending, key=lambda item: item[1].intent_at):
            wanted.setdefault(_signature(self.model_input(request)), []).append((request, cp))
        wanted.pop(None, None)
        floor = min(cp.intent_at for _, cp in pending) - _CLOCK_SKEW_S
        candidates: dict[tuple[str, str, str] | None, list[RemotePrediction]] = {}
        for prediction in self._api.recent(until=until, max_pages=_LIST_MAX_PAGES):
            created = prediction.created_at.timestamp() if prediction.created_at else None
            if created is not None and created < floor:
                break
            signature = _signature(prediction.input)
            if signature in wanted and prediction.id not in exclude:
                candidates.setdefault(signature, []).append(prediction)
        matches = []
        for signature, intents in wanted.items():
            left = list(reversed(candidates.get(signature, [])))  # earliest first
            for request, cp in intents:
                for prediction in left:
                    created = prediction.created_at.timestamp() if prediction.created_at else None
                    if created is None or created >= cp.intent_at - _CLOCK_SKEW_S:
                        left.remove(prediction)
                        matches.append((request, cp, prediction))
                        break
        return sorted(matches, key=lambda match: match[1].intent_at)

    # ------------------------------------------------------------------ output
    def _download(self, prediction: RemotePrediction) -> bytes:
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


def _signature(model_input: dict[str, Any]) -> tuple[str, str, str] | None:
    prompt, seed = model_input.get("prompt"), model_input.get("seed")
    if not isinstance(prompt, str) or seed is None:
        return None
    return prompt, str(model_input.get("negative_prompt", "")), str(seed)


def _after(deadline: float) -> float:
    """How long a request made for a prediction may wait for the budget: past the deadline
    there is still its verdict to read."""
    return max(deadline + _DEADLINE_GRACE_S, time.monotonic() + _AFTERMATH_S)


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
