"""The gateway's tokens (gateway/auth.py), its settings and ``refgen token``: every forged,
expired or misdirected token is refused, the rotation's old secret still verifies."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from pydantic import ValidationError

from gateway.access import MAX_PATH_CHARS, shown_path
from gateway.auth import Refused, Verifier, mint
from gateway.stream import is_stream_id
from tasks.cli import main
from worker.errors import ConfigurationError
from worker.settings import Settings

NEW = "n" * 16 + "0123456789abcdef"  # 32 characters, as GATEWAY_JWT_SECRET requires
OLD = "o" * 16 + "0123456789abcdef"
OTHER = "z" * 16 + "0123456789abcdef"


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def refused(verifier: Verifier, token: str) -> str:
    with pytest.raises(Refused) as caught:
        verifier.verify(token)
    assert caught.value.status == 401
    assert token not in caught.value.reason
    return caught.value.reason


def test_job_and_operator_tokens_grant_what_they_say() -> None:
    verifier = Verifier([NEW, OLD])
    job = verifier.verify(mint(NEW, job_id="job-1", ttl_s=60))
    assert (job.operator, job.job_id) == (False, "job-1")
    assert job.allows_job("job-1") and not job.allows_job("job-2")
    operator = verifier.verify(mint(NEW, operator=True, ttl_s=60))
    assert operator.operator and operator.allows_job("anything")
    # The format upstream services mint with their own library: a plain PyJWT encode.
    upstream = jwt.encode({"sub": "job-1", "exp": int(time.time()) + 60}, NEW, algorithm="HS256")
    assert verifier.verify(upstream).job_id == "job-1"


def test_rotation_verifies_with_either_secret_and_nothing_else() -> None:
    verifier = Verifier([NEW, OLD])
    assert verifier.verify(mint(OLD, job_id="j", ttl_s=60)).job_id == "j"
    refused(verifier, mint(OTHER, job_id="j", ttl_s=60))
    # Once the old secret is dropped, its tokens stop.
    refused(Verifier([NEW]), mint(OLD, job_id="j", ttl_s=60))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # HS384/512
def test_forged_expired_and_malformed_tokens_are_refused() -> None:
    verifier = Verifier([NEW])
    now = int(time.time())
    # alg none: no signature at all.
    none = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'j', 'exp': now + 60})}."
    refused(verifier, none)
    # Another algorithm, even with the right secret.
    for alg in ("HS384", "HS512"):
        refused(verifier, jwt.encode({"sub": "j", "exp": now + 60}, NEW, algorithm=alg))
    assert "expired" in refused(verifier, mint(NEW, job_id="j", expires=now - 60))
    refused(verifier, jwt.encode({"sub": "j"}, NEW, algorithm="HS256"))  # no exp
    refused(verifier, jwt.encode({"exp": now + 60}, NEW, algorithm="HS256"))  # grants nothing
    refused(verifier, jwt.encode({"sub": "a b", "exp": now + 60}, NEW, algorithm="HS256"))
    refused(verifier, jwt.encode({"sub": "j", "exp": "soon"}, NEW, algorithm="HS256"))
    refused(verifier, jwt.encode({"sub": "j", "exp": now + 60, "nbf": now + 600}, NEW))
    refused(verifier, "not.a.token")
    refused(verifier, "x" * 100_000)
    # A tampered payload: the operator scope added to a job token.
    header, _, signature = mint(NEW, job_id="j", ttl_s=60).split(".")
    forged = b64({"sub": "j", "exp": now + 60, "scope": "operator"})
    refused(verifier, f"{header}.{forged}.{signature}")


def test_a_few_seconds_of_leeway_for_clocks() -> None:
    verifier = Verifier([NEW])
    assert verifier.verify(mint(NEW, job_id="j", expires=int(time.time()) - 2)).job_id == "j"


def test_settings_for_the_secret(monkeypatch) -> None:
    for weak in ("short", "changeme" * 5, f"{NEW},{OLD},{OTHER}", f"{NEW},short"):
        with pytest.raises(ValidationError) as caught:
            Settings(gateway_jwt_secret=weak)
        assert weak not in str(caught.value)
    both = Settings(gateway_jwt_secret=f" {NEW} , {OLD} ")
    assert both.gateway_jwt_secrets == [NEW, OLD]
    assert NEW in both.secret_values() and OLD in both.secret_values()
    assert both.gateway_requires_tokens()
    # Production without a secret fails closed, unless told the network is private.
    with pytest.raises(ConfigurationError) as closed:
        Settings(environment="production").gateway_requires_tokens()
    assert "GATEWAY_JWT_SECRET is required in production" in closed.value.reason
    assert not Settings(environment="production", gateway_auth="off").gateway_requires_tokens()
    assert not Settings().gateway_requires_tokens()  # development stays open: make demo
    with pytest.raises(ConfigurationError):
        Settings(gateway_auth="on").gateway_requires_tokens()
    with pytest.raises(ValidationError):
        Settings(gateway_allowed_origins=["https://app.example/path"])
    assert Settings(gateway_allowed_origins="https://a.example, http://b.example:8080")


def test_refgen_token_prints_a_token_the_gateway_accepts(monkeypatch, capsys) -> None:
    from worker.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setenv("GATEWAY_JWT_SECRET", f"{NEW},{OLD}")
    try:
        assert main(["token", "job-7", "--ttl", "2m"]) == 0
        job = capsys.readouterr().out.strip()
        assert main(["token", "--operator", "--ttl", "1h"]) == 0
        operator = capsys.readouterr().out.strip()
        assert main(["token"]) == 2
        assert main(["token", "job-7", "--operator"]) == 2
        with pytest.raises(SystemExit):
            main(["token", "job-7", "--ttl", "soon"])
        get_settings.cache_clear()
        monkeypatch.delenv("GATEWAY_JWT_SECRET")
        assert main(["token", "job-7"]) == 5
        assert "GATEWAY_JWT_SECRET is not set" in capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    verifier = Verifier([OLD, NEW])  # signed with the first secret
    grant = verifier.verify(job)
    assert grant.job_id == "job-7" and not grant.operator
    assert 100 < grant.expires - time.time() <= 120
    assert verifier.verify(operator).operator
    assert jwt.decode(job, NEW, algorithms=["HS256"])["sub"] == "job-7"


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("1700000000000-0", True),
        ("0-0", True),
        (f"{2**64 - 1}-{2**64 - 2}", True),
        (f"{2**64 - 1}-{2**64 - 1}", False),  # the last id: Redis refuses a range after it
        ("99999999999999999999-0", False),  # over 2^64-1: Redis answers "Invalid stream ID"
        (f"0-{2**64}", False),
        ("١٢٣-0", False),  # Arabic-Indic digits: \d takes them, Redis does not
        ("１２３-0", False),  # fullwidth digits
        ("1-2-3", False),
        ("-1-0", False),
        ("1700000000000", False),
    ],
)
def test_stream_ids_are_validated_to_redis_range(text: str, valid: bool) -> None:
    assert is_stream_id(text) is valid


def test_long_paths_are_cut_in_the_access_log() -> None:
    assert shown_path("/jobs/abc") == "/jobs/abc"
    cut = shown_path("/" + "a" * 100_000)
    assert len(cut) < MAX_PATH_CHARS + 40 and cut.endswith("(+99745 chars)")
