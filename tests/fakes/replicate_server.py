"""A local fake of the Replicate HTTP API (the parts ``replicate==1.0.7`` uses for SDXL).

Usage::

    with FakeReplicate(api_token="r8_test") as fake:
        client = replicate.Client(api_token="r8_test", base_url=fake.url)
        client.poll_interval = 0.05          # default 0.5 s (env REPLICATE_POLL_INTERVAL)
        p = client.predictions.create(version=f"{SDXL_MODEL}:{SDXL_VERSION}", input={...})
        p.wait()                               # GET /v1/predictions/{id} until terminal
        png = httpx.get(p.output[0]).content   # GET /files/{id}.png on this server

Routes (what the real client sends; all JSON, ``Authorization: Bearer <token>``):

* ``POST /v1/predictions`` -- ``predictions.create(version=...)``.  The ``version`` string is
  sent verbatim: ``"<64-hex id>"``, ``"owner/name:<id>"`` and ``"owner/name"`` all go here
  unchanged (the client does *not* parse them; the API accepts all three).
  ``Prefer: wait`` / ``Prefer: wait=N`` (sent for ``wait=True|N``, and by ``client.run``) holds
  the response until the prediction is terminal or N s (max 60) have passed, then answers with
  the prediction as it stands.  ``Cancel-After: 90s`` (``1m``, ``1m30s``...) sets a deadline:
  reached before the run starts, the prediction ends ``aborted`` (no ``predict_time``, not
  billed); reached while it runs, ``canceled``, billed for the time run (its ``predict_time``).
* ``POST /v1/models/{owner}/{name}/predictions`` -- ``predictions.create(model=...)`` and
  ``client.run("owner/name")``; ``POST /v1/deployments/{owner}/{name}/predictions`` too.
* ``client.run("owner/name:id")`` posts ``{"version": "id"}`` to ``/v1/predictions`` and then
  ``GET /v1/models/{owner}/{name}/versions/{id}`` (served here).
* ``GET /v1/predictions`` -- ``predictions.list``: newest first, ``page_size`` (100) a page,
  ``next`` an absolute URL with a cursor, each entry the whole prediction (``input`` included).
* ``GET /v1/predictions/{id}`` -- ``predictions.get``, ``Prediction.reload`` and ``.wait``.
* ``POST /v1/predictions/{id}/cancel`` -- ``predictions.cancel`` / ``Prediction.cancel``.
* ``GET /v1/account`` -- ``accounts.current()``: the token's account (``type``, ``username``,
  ``name``, ``github_url``); the worker's warm-up opens its connections with it.
* ``GET /files/{id}.png`` -- output download (no auth).  ``FileOutput.read()`` GETs the
  absolute URL with the client's httpx client.  NB: ``client.run`` only wraps outputs that start
  with ``https:``/``data:`` in ``FileOutput``, so against this http:// fake it returns strings.

Errors are RFC 7807 problem JSON (``{"title", "detail", "status"}``); ``ReplicateError``
gets ``.status`` from the HTTP status and ``.detail``/``.title`` from the body.  The client's
``RetryTransport`` silently retries GET/PUT/DELETE (not POST) on 429/503/504 up to 10 attempts,
honouring ``Retry-After``; POST errors surface immediately.

Fault injection (route kinds: ``create``, ``get``, ``cancel``, ``list``, ``file``, ``version``,
``unknown``, or ``"*"``): ``inject(kind, Fault(...), times)`` plus the helpers
``throttle_next_creates``, ``fail_next_creates``, ``lose_next_create_answers`` (the create is
made and billed, its answer lost: an edge's 502 or a closed connection),
``reject_next_create_invalid_version``,
``fail_next_gets``, ``delay_next``.  Prediction behaviour is scripted separately with
``script_next_prediction(**PredictionPlan fields)``, ``hang_next_prediction`` and
``fail_next_prediction`` (FIFO, one plan per successful create; otherwise ``default_plan``).

Rate limits (off unless set; ``set_rate_limits`` or the constructor): ``creates_per_minute``
for creates, ``requests_per_minute`` for every other API request (gets, cancels, lists...;
downloads of outputs are another host's and never counted), each a token bucket holding
``burst_s`` seconds' worth.  Over a limit the answer is Replicate's 429: ``{"detail": "Request
was throttled. Your rate limit resets in ~Ns."}`` with ``Retry-After: N``; ``throttled`` lists
the requests so refused.

Recorded state: ``requests`` / ``requests_for(route, method)`` (every request),
``api_requests`` (every request but downloads), ``create_count`` (create requests received,
faulted ones included), ``creates`` (one :class:`CreateCall` per prediction created),
``cancels`` (ids), ``get_count(id)``, ``prediction_json(id)``, ``status(id)``, and what the
real service would bill: ``bills(price)`` per prediction and ``billed(price)`` in all
(``predict_time`` of finished runs, failed ones included; the time run of cancelled ones;
nothing for aborted ones).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import secrets
import string
import threading
import time
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from ._http import FakeHTTPServer, Fault, RecordedRequest, Response, Route, json_response
from ._replicate_model import (
    INVALID_VERSION_DETAIL,
    INVALID_VERSION_TITLE,
    NSFW_ERROR,
    SDXL_MODEL,
    SDXL_VERSION,
    TERMINAL,
    CreateCall,
    Prediction,
    PredictionPlan,
    TokenBucket,
    make_png,
    parse_cancel_after,
    problem,
    throttled,
)

__all__ = [
    "NSFW_ERROR",
    "SDXL_MODEL",
    "SDXL_VERSION",
    "CreateCall",
    "FakeReplicate",
    "Fault",
    "PredictionPlan",
    "make_png",
]

_EDGE_502 = (
    "<html><head><title>502 Bad Gateway</title></head>"
    "<body><center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>"
)
_OWN = r"(?P<owner>[^/]+)/(?P<name>[^/]+)"
_PID = r"(?P<id>[^/]+)"


class FakeReplicate(FakeHTTPServer):
    def __init__(
        self,
        *,
        api_token: str | None = "r8_fake_test_token",  # None disables the auth check
        host: str = "127.0.0.1",
        port: int = 0,
        default_plan: PredictionPlan | None = None,
        default_model: str = SDXL_MODEL,  # model reported for a bare version id
        known_versions: dict[str, str] | None = None,  # version id -> "owner/name"; None = any
        image_size: tuple[int, int] = (1024, 1024),
        image_bytes: bytes | None = None,  # output file bytes (default: PNG of image_size)
        image_content_type: str = "image/png",
        creates_per_minute: float | None = None,
        requests_per_minute: float | None = None,
        burst_s: float = 1.0,
        # Predictions on the default plan take a duration drawn from this range (seeded).
        duration_range: tuple[float, float] | None = None,
        seed: int = 0,
        page_size: int = 100,
    ) -> None:
        super().__init__(host=host, port=port)
        self.api_token = api_token
        self.default_plan = default_plan or PredictionPlan()
        self.default_model = default_model
        self.known_versions = known_versions
        self.image_bytes = image_bytes if image_bytes is not None else make_png(*image_size)
        self.image_content_type = image_content_type
        self.duration_range = duration_range
        self.page_size = page_size
        # False: the server ignores Cancel-After, as one predating prediction deadlines would.
        self.honour_cancel_after = True
        self._random = random.Random(seed)
        self._limits: dict[str, TokenBucket] = {}
        self.set_rate_limits(creates_per_minute, requests_per_minute, burst_s)
        self._throttled: list[RecordedRequest] = []
        self._changed = threading.Condition(self._lock)
        self._plans: deque[PredictionPlan] = deque()
        self._predictions: dict[str, Prediction] = {}
        self._creates: list[CreateCall] = []
        self._cancels: list[str] = []
        routes: list[tuple[str, str, str, Any]] = [
            ("POST", r"/v1/predictions/?", "create", self._create),
            ("POST", rf"/v1/models/{_OWN}/predictions/?", "create", self._create),
            ("POST", rf"/v1/deployments/{_OWN}/predictions/?", "create", self._create),
            ("GET", r"/v1/predictions/?", "list", self._list),
            ("GET", rf"/v1/predictions/{_PID}/?", "get", self._get),
            ("POST", rf"/v1/predictions/{_PID}/cancel/?", "cancel", self._cancel),
            ("GET", rf"/v1/models/{_OWN}/versions/(?P<vid>[^/]+)/?", "version", self._version),
            ("GET", r"/v1/account/?", "account", self._account),
            ("GET", r"/files/(?P<file>[^/]+)", "file", self._file),
        ]
        self._routes = [Route(m, re.compile(p), kind, fn) for m, p, kind, fn in routes]

    # ------------------------------------------------------------ scripting API
    def script_next_prediction(self, **changes: Any) -> PredictionPlan:
        """Queue ``replace(default_plan, **changes)`` for the next successful create."""
        plan = replace(self.default_plan, **changes)
        with self._lock:
            self._plans.append(plan)
        return plan

    def hang_next_prediction(self) -> PredictionPlan:
        return self.script_next_prediction(outcome="hang")

    def fail_next_prediction(self, error: str = NSFW_ERROR) -> PredictionPlan:
        return self.script_next_prediction(outcome="failed", error=error)

    def throttle_next_creates(self, retry_after: int = 1, times: int = 1) -> None:
        resp = throttled(retry_after)
        self.inject("create", Fault(429, resp.body, resp.headers), times)

    def fail_next_creates(self, status: int = 503, times: int = 1) -> None:
        self.inject("create", Fault(status), times)

    def lose_next_create_answers(
        self,
        times: int = 1,
        *,
        delay: float = 0.2,
        disconnect: bool = False,
        prompt_contains: str | None = None,
    ) -> None:
        """The next creates are made, run and billed, and their answers lost: an edge's HTML
        502 after ``delay`` (its sync hold cut short), or a connection closed (a reset)."""
        fault = Fault(
            None if disconnect else 502,
            _EDGE_502,
            delay=delay,
            disconnect=disconnect,
            only_if_body_contains=prompt_contains,
            lost_answer=True,
        )
        self.inject("create", fault, times)

    def reject_next_create_invalid_version(self, times: int = 1) -> None:
        resp = problem(422, INVALID_VERSION_DETAIL, INVALID_VERSION_TITLE)
        self.inject("create", Fault(422, resp.body, resp.headers), times)

    def fail_next_gets(self, status: int = 500, times: int = 1) -> None:
        self.inject("get", Fault(status), times)

    def delay_next(self, route: str, seconds: float, times: int = 1) -> None:
        self.inject(route, Fault(delay=seconds), times)

    def set_rate_limits(
        self,
        creates_per_minute: float | None = None,
        requests_per_minute: float | None = None,
        burst_s: float = 1.0,
    ) -> None:
        """Limit creates and every other API request (None: unlimited); buckets start full."""
        with self._lock:
            self._limits = {}
            if creates_per_minute is not None:
                self._limits["create"] = TokenBucket(creates_per_minute, burst_s)
            if requests_per_minute is not None:
                self._limits["other"] = TokenBucket(requests_per_minute, burst_s)

    # ------------------------------------------------------------ accessors
    @property
    def create_count(self) -> int:
        """Create requests received, including faulted and rejected ones."""
        return len(self.requests_for("create"))

    @property
    def creates(self) -> list[CreateCall]:
        with self._lock:
            return list(self._creates)

    @property
    def cancels(self) -> list[str]:
        with self._lock:
            return list(self._cancels)

    def get_count(self, prediction_id: str | None = None) -> int:
        gets = self.requests_for("get")
        if prediction_id is None:
            return len(gets)
        return sum(1 for r in gets if r.path.rstrip("/").rsplit("/", 1)[-1] == prediction_id)

    def prediction_json(self, prediction_id: str) -> dict[str, Any]:
        with self._lock:
            return self._predictions[prediction_id].to_json(self.url)

    def status(self, prediction_id: str) -> str:
        with self._lock:
            return self._predictions[prediction_id].status

    def age_s(self, prediction_id: str) -> float:
        """Seconds since its creation, on the clock its timeline runs on: a test can tell
        whether something came before a moment of that timeline (its start, its end)."""
        with self._lock:
            return time.monotonic() - self._predictions[prediction_id].created

    def ended_after_s(self, prediction_id: str) -> float | None:
        """When it ended, in seconds after its creation (None: not yet): the server's own
        figure, exactly its Cancel-After deadline when that ended it."""
        with self._lock:
            return self._predictions[prediction_id].state()[2]

    @property
    def api_requests(self) -> list[RecordedRequest]:
        """Every request to the API: what Replicate's rate limits count (downloads are not)."""
        return [r for r in self.requests if r.route != "file"]

    @property
    def throttled(self) -> list[RecordedRequest]:
        """Requests refused with a 429 by the rate limits (not injected faults)."""
        with self._lock:
            return list(self._throttled)

    def bills(self, price_per_second: Decimal) -> dict[str, Decimal]:
        """What the real service bills each prediction so far, at ``price_per_second``."""
        with self._lock:
            return {
                pid: Decimal(str(p.billed_seconds())) * price_per_second
                for pid, p in self._predictions.items()
            }

    def billed(self, price_per_second: Decimal) -> Decimal:
        return sum(self.bills(price_per_second).values(), Decimal(0))

    # ------------------------------------------------------------ handlers
    def _default_fault_response(self, status: int) -> Response:
        if status == 429:
            return throttled(1)
        return problem(status, f"Simulated upstream error ({status}).")

    def _admit(self, req: RecordedRequest) -> Response | None:
        if req.route == "file":
            return None
        with self._lock:
            bucket = self._limits.get("create" if req.route == "create" else "other")
            wait = bucket.take(req.timestamp) if bucket is not None else 0.0
            if wait <= 0:
                return None
            self._throttled.append(req)
        return throttled(max(1, math.ceil(wait)))

    def _auth_error(self, req: RecordedRequest) -> Response | None:
        if self.api_token is None:
            return None
        header = req.headers.get("authorization", "")
        if not header:
            return problem(401, "You did not pass an authentication token")
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("bearer", "token") or token.strip() != self.api_token:
            return problem(401, "You did not pass a valid authentication token")
        return None

    def _resolve(self, m: re.Match[str], body: dict[str, Any]) -> tuple[str, str] | Response:
        """(model, version) for a create request, from the URL or the ``version`` field."""
        if "owner" in m.groupdict():
            model = f"{m['owner']}/{m['name']}"
            return model, hashlib.sha256(model.encode()).hexdigest()
        field = body.get("version")
        if not isinstance(field, str) or not field:
            detail = "- version: Invalid type. Expected: string, given: null"
            return problem(422, detail, "Input validation failed")
        ref = re.fullmatch(r"(?P<model>[^/:]+/[^/:]+)(?::(?P<vid>.+))?", field)
        if ref and ref["vid"] is None:  # "owner/name": the model's latest/official version
            return ref["model"], hashlib.sha256(ref["model"].encode()).hexdigest()
        vid = ref["vid"] if ref else field
        if self.known_versions is not None and vid not in self.known_versions:
            return problem(422, INVALID_VERSION_DETAIL, INVALID_VERSION_TITLE)
        model = ref["model"] if ref else (self.known_versions or {}).get(vid, self.default_model)
        return model, vid

    def _create(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth_error(req):
            return err
        try:
            body = req.json() or {}
        except ValueError:
            return problem(400, "Request body is not valid JSON.")
        if not isinstance(body.get("input"), dict):
            detail = "- input: Invalid type. Expected: object, given: null"
            return problem(422, detail, "Input validation failed")
        resolved = self._resolve(m, body)
        if isinstance(resolved, Response):
            return resolved
        model, version = resolved
        cancel_after = req.headers.get("cancel-after")
        deadline = parse_cancel_after(cancel_after) if cancel_after is not None else None
        if cancel_after is not None and deadline is None:
            return problem(422, f"Invalid Cancel-After header: {cancel_after!r}")
        pid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(26))
        prefer = req.headers.get("prefer")
        with self._lock:
            plan = next((p for p in self._plans if p.applies_to(body["input"])), None)
            if plan is not None:
                self._plans.remove(plan)
            else:
                plan = self._default_plan()
            pred = Prediction(
                pid, model, version, body["input"], plan, req.timestamp, datetime.now(UTC)
            )
            pred.deadline = deadline if self.honour_cancel_after else None
            self._predictions[pid] = pred
            call = CreateCall(
                pid,
                req.path,
                body.get("version"),
                model,
                version,
                body["input"],
                prefer,
                req.timestamp,
                cancel_after,
            )
            self._creates.append(call)
        if wait := re.fullmatch(r"\s*wait\s*(?:=\s*(\d+))?\s*", prefer or ""):
            self._hold(pred, until=req.timestamp + min(int(wait[1] or 60), 60))
        with self._lock:
            return json_response(201, pred.to_json(self.url))

    def _default_plan(self) -> PredictionPlan:
        if self.duration_range is None:
            return self.default_plan
        duration = self._random.uniform(*self.duration_range)
        starting = min(1.0, duration / 5)
        return replace(
            self.default_plan,
            duration=round(duration, 3),
            starting_for=round(starting, 3),
            predict_time=round(duration - starting, 3),
        )

    def _hold(self, pred: Prediction, until: float) -> None:
        """Sync mode: wake when the prediction changes (its own timeline, or a cancel)."""
        with self._changed:
            while pred.status not in TERMINAL and not self._stopping.is_set():
                left = until - time.monotonic()
                if left <= 0:
                    return
                change = pred.next_change_in()
                self._changed.wait(min(left, 0.5, change if change is not None else left))

    def _lookup(self, req: RecordedRequest, m: re.Match[str]) -> Prediction | Response:
        if err := self._auth_error(req):
            return err
        with self._lock:
            pred = self._predictions.get(unquote(m["id"]))
        return pred if pred else problem(404, "Not found.")

    def _get(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        pred = self._lookup(req, m)
        if isinstance(pred, Response):
            return pred
        with self._lock:
            return json_response(200, pred.to_json(self.url))

    def _cancel(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        pred = self._lookup(req, m)
        if isinstance(pred, Response):
            return pred
        with self._lock:
            self._cancels.append(pred.id)
            pred.cancel()
            self._changed.notify_all()
            return json_response(200, pred.to_json(self.url))

    def _list(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth_error(req):
            return err
        try:
            before = int(req.query.get("cursor", ["-1"])[0])
        except ValueError:
            return problem(400, "Invalid cursor.")
        with self._lock:
            newest_first = list(reversed(self._predictions.values()))
            # The cursor is a position counted from the oldest, so new predictions arriving
            # between pages do not shift the ones still to come.
            start = 0 if before < 0 else max(0, len(newest_first) - before)
            page = newest_first[start : start + self.page_size]
            results = [p.to_json(self.url) for p in page]
            left = len(newest_first) - start - len(page)
        following = f"{self.url}/v1/predictions?cursor={left}" if left > 0 else None
        return json_response(200, {"next": following, "previous": None, "results": results})

    def _version(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth_error(req):
            return err
        vid = unquote(m["vid"])
        if self.known_versions is not None and vid not in self.known_versions:
            return problem(404, "Not found.")
        output = {"type": "array", "items": {"type": "string", "format": "uri"}, "title": "Output"}
        schema = {"openapi": "3.0.2", "components": {"schemas": {"Output": output}}}
        version = {"id": vid, "created_at": "2023-07-26T17:53:09.882651Z", "cog_version": "0.8.6"}
        return json_response(200, {**version, "openapi_schema": schema})

    def _account(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        if err := self._auth_error(req):
            return err
        account = {"type": "organization", "username": "acme", "name": "Acme"}
        return json_response(200, {**account, "github_url": None})

    def _file(self, req: RecordedRequest, m: re.Match[str]) -> Response:
        name = unquote(m["file"])
        with self._lock:
            pred = self._predictions.get(re.sub(r"(-\d+)?\.png$", "", name))
            ok = pred is not None and pred.status == "succeeded" and name in pred.output_names()
        if pred is None or not ok:
            return Response(404, b"Not Found", {"Content-Type": "text/plain"})
        data = pred.plan.image_bytes if pred.plan.image_bytes is not None else self.image_bytes
        headers = {"Content-Type": self.image_content_type, "Cache-Control": "max-age=3600"}
        return Response(200, data, headers)
