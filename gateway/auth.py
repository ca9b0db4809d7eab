"""Who may see what at the gateway: JWTs signed HS256 with ``GATEWAY_JWT_SECRET``.

The format is the one every upstream stack can mint with its own JWT library: ``sub`` is a job
id and grants that job's page and stream; ``"scope": "operator"`` grants the index, every job
and ``/metrics``; ``exp`` is required. Tokens come as ``?token=`` (EventSource cannot set
headers) or ``Authorization: Bearer``. Verification is PyJWT's, with HS256 alone allowed (so
``alg: none`` and every other algorithm are refused) and a few seconds of leeway for clocks.
The secret setting may hold two secrets, the first signing and both verifying, so a secret is
rotated without a minute of refusals.

``RequireToken`` checks every request before routing, so a refused request never reaches a
handler, a Redis call or a stream slot. ``/healthz`` (load balancers), ``/static/`` (the
pages' scripts and styles) and ``/files/`` (its own signed links) are open.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from worker import constants as c

ALGORITHM = "HS256"
LEEWAY_S = 5
OPERATOR_SCOPE = "operator"
# A token longer than this is no token of ours: refused before it is parsed.
_MAX_TOKEN_CHARS = 4096
# Open: the load balancers' check, and two prefixes whose routes take one file name (static)
# or check a signature (files), so a path such as /static/../jobs/x reaches no job.
_OPEN_PATHS = ("/healthz",)
_OPEN_PREFIXES = ("/static/", "/files/")
_JOB_PATH = re.compile(r"/jobs/([^/]*)(/events)?")
_JOB_ID = re.compile(c.ID_PATTERN)


class Refused(Exception):
    """A request without the right token: ``status`` is 401 (no valid token) or 403 (a valid
    token for something else). ``reason`` is safe to show: it never holds the token."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """What a verified token allows, and until when (``exp``, epoch seconds)."""

    operator: bool
    job_id: str | None
    expires: int

    def allows_job(self, job_id: str) -> bool:
        return self.operator or self.job_id == job_id


class Verifier:
    def __init__(self, secrets: list[str], *, leeway_s: float = LEEWAY_S) -> None:
        if not secrets:
            raise ValueError("a verifier needs at least one secret")
        self._secrets = secrets
        self._leeway = leeway_s

    def verify(self, token: str) -> Grant:
        """The grant of a token signed by one of the secrets; raises ``Refused`` (401)."""
        if len(token) > _MAX_TOKEN_CHARS:
            raise Refused(401, "the token is not valid")
        claims: dict[str, Any] | None = None
        for secret in self._secrets:
            try:
                claims = jwt.decode(
                    token,
                    secret,
                    algorithms=[ALGORITHM],
                    options={"require": ["exp"], "verify_aud": False},
                    leeway=self._leeway,
                )
                break
            except jwt.InvalidSignatureError:
                continue  # maybe signed with the other secret, during a rotation
            except jwt.ExpiredSignatureError:
                raise Refused(401, "the token has expired") from None
            except jwt.InvalidTokenError:
                raise Refused(401, "the token is not valid") from None
        if claims is None:
            raise Refused(401, "the token is not valid")
        operator = claims.get("scope") == OPERATOR_SCOPE
        subject = claims.get("sub")
        job_id = subject if isinstance(subject, str) and _JOB_ID.fullmatch(subject) else None
        if not operator and job_id is None:
            raise Refused(401, "the token grants nothing: it needs a job id as sub")
        return Grant(operator=operator, job_id=job_id, expires=int(claims["exp"]))

    def mint_for_job(self, job_id: str, expires: int) -> str:
        """A token for one job's page and stream, for a page to hand to its stream (never the
        operator's own token)."""
        return mint(self._secrets[0], job_id=job_id, expires=expires)


def mint(
    secret: str,
    *,
    job_id: str | None = None,
    operator: bool = False,
    ttl_s: float | None = None,
    expires: int | None = None,
) -> str:
    """A token as upstream services mint them (README: Security)."""
    if expires is None:
        if ttl_s is None or ttl_s <= 0:
            raise ValueError("a token needs a positive lifetime")
        expires = int(time.time() + ttl_s)
    claims: dict[str, Any] = {"exp": expires, "iat": int(time.time())}
    if job_id is not None:
        claims["sub"] = job_id
    if operator:
        claims["scope"] = OPERATOR_SCOPE
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def presented_token(scope: Scope) -> str | None:
    """The token of a request: ``Authorization: Bearer`` first, else ``?token=``."""
    authorization = Headers(scope=scope).get("authorization", "")
    kind, _, value = authorization.partition(" ")
    if kind.lower() == "bearer" and value.strip():
        return value.strip()
    query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
    return query.get("token") or None


def grant_of(scope: Scope) -> Grant | None:
    """The grant ``RequireToken`` found for this request; None when tokens are off."""
    grant = scope.get("state", {}).get("grant")
    return grant if isinstance(grant, Grant) else None


class RequireToken:
    """ASGI middleware: each request's token must grant its path, or it is answered here."""

    def __init__(self, app: ASGIApp, verifier: Verifier) -> None:
        self._app = app
        self._verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope["type"] != "http" or path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            await self._app(scope, receive, send)
            return
        try:
            grant = self._check(scope)
        except Refused as refusal:
            await _refuse(refusal, scope, receive, send)
            return
        scope.setdefault("state", {})["grant"] = grant
        await self._app(scope, receive, send)

    def _check(self, scope: Scope) -> Grant:
        token = presented_token(scope)
        if token is None:
            raise Refused(401, "a token is required (?token= or Authorization: Bearer)")
        grant = self._verifier.verify(token)
        job = _JOB_PATH.fullmatch(scope["path"])
        if job is not None:
            if not grant.allows_job(job[1]):
                raise Refused(403, "this token is for another job")
        elif not grant.operator:
            raise Refused(403, "an operator token is required")
        return grant


async def _refuse(refusal: Refused, scope: Scope, receive: Receive, send: Send) -> None:
    headers = {"Cache-Control": "no-store"}
    if refusal.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="refgen"'
    body = {"detail": refusal.reason}
    response = JSONResponse(body, status_code=refusal.status, headers=headers)
    await response(scope, receive, send)
