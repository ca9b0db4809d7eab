"""Replicate's HTTP API as the worker uses it, through the official client (``replicate`` 1.0.x).

The requests go through the client's own httpx client, so its base URL, token, timeouts and
retry transport (and our budget transport under it) all apply; the answers are read here:
- ``predictions.create`` can send ``Prefer: wait`` (its ``wait=``) but no other header, and it
  drops unknown keyword arguments silently: there is no way to send ``Cancel-After`` through it;
- the client parses every prediction into a model whose ``status`` accepts only ``starting``,
  ``processing``, ``succeeded``, ``failed`` and ``canceled``: an ``aborted`` prediction (its
  deadline passed before it started) makes ``create``, ``get`` and ``list`` raise a validation
  error, and ``Prediction.wait()`` would loop on it forever.
Every library exception leaves this module as one of ours (``worker.errors``).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import structlog
from replicate.client import Client as ReplicateClient
from replicate.exceptions import ReplicateError

from worker import constants as c
from worker.errors import PermanentError, RateLimitedError, RefgenError, RetryableError
from worker.ratelimit import ADMITTED_EXTENSION, DEADLINE_EXTENSION, parse_retry_after

log = structlog.get_logger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
# Past its limit, how long the warm-up gives its requests to hand their connections back.
_WARM_GRACE_S = 0.5


@dataclass(frozen=True)
class RemotePrediction:
    id: str
    status: str
    input: dict[str, Any]
    output: Any
    error: str | None
    predict_time: float | None
    created_at: datetime | None
    started: bool

    @classmethod
    def from_json(cls, data: Any) -> RemotePrediction:
        if not isinstance(data, dict) or not isinstance(data.get("id"), str):
            raise RetryableError("Replicate answered with something that is not a prediction")
        metrics = data.get("metrics") or {}
        raw_time = metrics.get("predict_time") if isinstance(metrics, dict) else None
        predict_time = float(raw_time) if isinstance(raw_time, int | float) else None
        model_input = data.get("input")
        return cls(
            id=data["id"],
            status=str(data.get("status") or "starting"),
            input=model_input if isinstance(model_input, dict) else {},
            output=data.get("output"),
            error=None if data.get("error") is None else str(data["error"]),
            predict_time=predict_time if predict_time is not None and predict_time >= 0 else None,
            created_at=_timestamp(data.get("created_at")),
            started=data.get("started_at") is not None,
        )

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class ReplicateApi:
    """Takes a ready-made client; tests point one at the local Replicate-like server."""

    def __init__(self, client: ReplicateClient, *, http_timeout_s: float = 30.0) -> None:
        # The client builds its httpx client on first use; built here, once, not by whichever
        # worker threads get there first.
        self._http: httpx.Client = client._client
        self._timeout = httpx.Timeout(http_timeout_s, connect=min(5.0, http_timeout_s))

    def create(
        self,
        version: str,
        model_input: dict[str, Any],
        *,
        wait_s: int | None,
        cancel_after_s: int,
        until: float,
        admitted: bool = False,
    ) -> RemotePrediction:
        """A prediction, created with a deadline Replicate enforces and, when ``wait_s`` is
        given, held open until it ends or ``wait_s`` passes (sync mode)."""
        headers = {"Cancel-After": f"{cancel_after_s}s"}
        timeout = self._timeout
        if wait_s is not None:
            headers["Prefer"] = f"wait={wait_s}"
            # The server answers after at most wait_s; the read timeout covers that too.
            read = wait_s + (self._timeout.read or 30.0)
            timeout = httpx.Timeout(read, connect=self._timeout.connect)
        body = {"version": version, "input": model_input}
        data = self._send(
            "POST",
            "/v1/predictions",
            until=until,
            admitted=admitted,
            json=body,
            headers=headers,
            timeout=timeout,
        )
        return RemotePrediction.from_json(data)

    def get(self, prediction_id: str, *, until: float) -> RemotePrediction:
        return RemotePrediction.from_json(
            self._send("GET", f"/v1/predictions/{prediction_id}", until=until)
        )

    def cancel(self, prediction_id: str, *, until: float) -> RemotePrediction:
        return RemotePrediction.from_json(
            self._send("POST", f"/v1/predictions/{prediction_id}/cancel", until=until)
        )

    def recent(self, *, until: float, max_pages: int) -> Iterator[RemotePrediction]:
        """The account's predictions, newest first, at most ``max_pages`` pages of them."""
        url: str | None = "/v1/predictions"
        for _ in range(max_pages):
            if url is None:
                return
            page = self._send("GET", url, until=until)
            results = page.get("results") if isinstance(page, dict) else None
            for entry in results or []:
                try:
                    yield RemotePrediction.from_json(entry)
                except RefgenError:
                    continue  # one odd entry is no reason to stop looking
            following = page.get("next") if isinstance(page, dict) else None
            url = following if isinstance(following, str) and following else None

    def open_connections(self, count: int, *, within_s: float) -> int:
        """Leave ``count`` connections to the API open in the client's pool, each opened by a
        request for the account (``GET /v1/account``: small, and counted with the reads, not
        the creates). The requests are held open together, so that each takes a connection of
        its own. Returns how many the API answered 200 within ``within_s``; never raises."""
        if count < 1:
            return 0
        until = time.monotonic() + within_s
        timeout = httpx.Timeout(within_s, connect=min(within_s, self._timeout.connect or within_s))
        together = threading.Barrier(count, timeout=within_s)

        def one(_: int) -> bool:
            extensions = {DEADLINE_EXTENSION: until, ADMITTED_EXTENSION: False}
            try:
                request = self._http.build_request(
                    "GET", "/v1/account", extensions=extensions, timeout=timeout
                )
                response = self._http.send(request, stream=True)
            except (httpx.HTTPError, RefgenError):
                together.abort()
                return False
            with contextlib.suppress(threading.BrokenBarrierError):
                together.wait()  # each answer held unread, its connection with it
            try:
                # Read to its end, which puts the connection back in the pool, open (one
                # closed mid-answer would be dropped).
                response.read()
            except httpx.HTTPError:
                return False
            finally:
                response.close()
            return response.status_code == 200

        # Not waited for past the limit: the client's own transport retries a read answered
        # 429 or 503 after its Retry-After (up to a minute), which the start must not wait out.
        pool = ThreadPoolExecutor(count, thread_name_prefix="replicate-warmup")
        started = [pool.submit(one, n) for n in range(count)]
        done, _ = wait(started, timeout=within_s + _WARM_GRACE_S)
        pool.shutdown(wait=False)
        return sum(1 for future in done if future.exception() is None and future.result())

    def _send(
        self, method: str, url: str, *, until: float, admitted: bool = False, **kwargs: Any
    ) -> Any:
        extensions = {DEADLINE_EXTENSION: until, ADMITTED_EXTENSION: admitted}
        kwargs.setdefault("timeout", self._timeout)
        try:
            # The client's own httpx client: base URL, token, retries, our budget transport.
            response = self._http.request(method, url, extensions=extensions, **kwargs)
        except httpx.TimeoutException:
            raise RetryableError("Replicate did not answer in time") from None
        except httpx.TransportError:
            raise RetryableError("Could not reach Replicate") from None
        if response.status_code >= 400:
            raise classify(ReplicateError.from_response(response), response.headers)
        try:
            return response.json()
        except ValueError:
            raise RetryableError("Replicate sent an answer that is not JSON") from None


def classify(exc: ReplicateError, headers: httpx.Headers) -> RefgenError:
    status = exc.status or 0
    if status == 429:
        retry_after = parse_retry_after(headers.get("retry-after"))
        return RateLimitedError("Rate limited by Replicate", retry_after_s=retry_after)
    if status >= 500:
        return RetryableError(f"Replicate is having trouble (HTTP {status})")
    if status in (401, 403):
        return PermanentError(f"Replicate refused the API token (HTTP {status})")
    detail = short(exc.detail or exc.title or "")
    return PermanentError(f"Replicate refused the request (HTTP {status}): {detail}")


def sync_wait_s(remaining_s: float) -> int | None:
    """``Prefer: wait=N``: whole seconds, at most Replicate's 60 and the time left."""
    n = min(c.REPLICATE_MAX_WAIT_S, math.floor(remaining_s))
    return n if n >= 1 else None


def cancel_after_s(remaining_s: float) -> int:
    """``Cancel-After`` in whole seconds, rounded up: Replicate never stops a prediction
    before the worker would have (nor later than its own 30-minute limit)."""
    return max(1, min(c.REPLICATE_MAX_RUN_S, math.ceil(remaining_s)))


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _timestamp(raw: Any) -> datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
