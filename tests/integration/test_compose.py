"""docker-compose.yml and the Dockerfile, checked without Docker (it does not run here).

The file's shape: the five services, a healthcheck each, Redis with AOF, no literal secrets,
start order on health, the storage the worker and the gateway share. Its commands: every
``refgen``/``celery`` command and healthcheck is a real entry point (``--help`` exits 0). Then
the stack itself: each service's command and healthcheck run here as Compose would run them,
interpolated against an empty host environment, with Redis, ports and ``/data`` mapped to
private ones; every service turns healthy and a job's images are served by the gateway at the
links the worker made. The Dockerfile: a pinned install as root, a non-root user to run, and a
build context that holds everything the package is built from.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import yaml

from gateway.auth import mint
from tasks.harness import JobRunner, base_worker_env, stop_process_group
from tasks.localredis import RedisServer, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = {"redis", "worker", "beat", "flower", "gateway"}
APP_SERVICES = sorted(SERVICES - {"redis"})

# How the image runs the project's commands, as this test runs them.
ENTRY_POINTS = {
    "refgen": [sys.executable, "-m", "tasks.cli"],
    "celery": [sys.executable, "-m", "celery"],
}
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|BASIC_AUTH", re.IGNORECASE)
SHELL_OPERATORS = {"||", "&&", ";", "|", "&"}


def service(name: str) -> dict[str, Any]:
    return COMPOSE["services"][name]


def environment(name: str) -> dict[str, str | None]:
    env = service(name).get("environment") or {}
    assert isinstance(env, dict), f"{name}: use the mapping form for environment"
    return env


# Compose's interpolation: $$ is a literal $, ${VAR}, ${VAR:-default}, ${VAR-default},
# ${VAR:?error}, ${VAR?error} and $VAR take values from the host environment.
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_]\w*))"
)
_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, host: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        value, op = host.get(name), match["op"] or ""
        missing = not value if op.startswith(":") else value is None
        if op.endswith("-") and missing:
            return match["arg"]
        if op.endswith("?") and missing:
            raise ValueError(f"{name} is required: {match['arg']}")
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def container_env(name: str, host: Mapping[str, str]) -> dict[str, str]:
    """The service's environment as Compose hands it over: a variable without a value takes
    the host's, or is left out when the host has none."""
    env: dict[str, str] = {}
    for key, value in environment(name).items():
        if value is None:
            if key in host:
                env[key] = host[key]
        else:
            env[key] = interpolate(str(value), host)
    return env


def healthcheck_argv(test: list[str], host: Mapping[str, str]) -> list[str]:
    """The program a healthcheck runs: CMD as it is, CMD-SHELL up to its first operator."""
    kind, *rest = test
    if kind == "CMD":
        return [interpolate(arg, host) for arg in rest]
    assert kind == "CMD-SHELL", f"unexpected healthcheck form {kind}"
    words = shlex.split(interpolate(rest[0], host))
    cut = next((i for i, word in enumerate(words) if word in SHELL_OPERATORS), len(words))
    return words[:cut]


def seconds(duration: str | int | float) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(duration))
    assert match, f"unparsed duration {duration!r}"
    return float(match[1]) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[match[2]]


def project_commands() -> list[tuple[str, list[str]]]:
    """Every refgen/celery program the file runs: each service's command and healthcheck."""
    found = []
    for name in sorted(COMPOSE["services"]):
        spec = service(name)
        command = [interpolate(str(arg), {}) for arg in spec.get("command") or []]
        if command[:1] and command[0] in ENTRY_POINTS:
            found.append((f"{name}-command", command))
        test = (spec.get("healthcheck") or {}).get("test")
        if test:
            argv = healthcheck_argv(test, {})
            if argv[:1] and argv[0] in ENTRY_POINTS:
                found.append((f"{name}-healthcheck", argv))
    return found


def python_healthchecks() -> list[tuple[str, str]]:
    found = []
    for name in sorted(COMPOSE["services"]):
        test = (service(name).get("healthcheck") or {}).get("test") or []
        argv = healthcheck_argv(test, {}) if test else []
        if argv[:2] == ["python", "-c"]:
            found.append((name, argv[2]))
    return found


@pytest.fixture
def help_env(tmp_path: Path) -> dict[str, str]:
    return base_worker_env("redis://127.0.0.1:9/0", tmp_path / "storage")


# --- The file's shape -------------------------------------------------------------------------


def test_the_file_is_yaml_with_exactly_the_five_services() -> None:
    assert isinstance(COMPOSE, dict)
    assert set(COMPOSE["services"]) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_and_a_restart_policy(name: str) -> None:
    spec = service(name)
    check = spec.get("healthcheck")
    assert check, f"{name} has no healthcheck"
    assert not check.get("disable")
    assert isinstance(check["test"], list) and check["test"][0] in ("CMD", "CMD-SHELL")
    assert len(check["test"]) > 1
    for key in ("interval", "timeout"):
        assert seconds(check[key]) > 0
    assert int(check["retries"]) >= 1
    assert spec.get("restart") in ("always", "unless-stopped", "on-failure")


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = service("redis")
    command = shlex.split(redis["command"][-1])
    assert command[command.index("--appendonly") + 1] == "yes"
    # The official image's entrypoint drops root only for a first argument of redis-server.
    assert command[:3] == ["exec", "docker-entrypoint.sh", "redis-server"]
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "-e", "ping"]


@pytest.mark.parametrize("name", APP_SERVICES)
def test_services_start_once_redis_is_healthy(name: str) -> None:
    spec = service(name)
    assert spec["depends_on"]["redis"]["condition"] == "service_healthy"
    user = "gateway@" if name == "gateway" else ""
    assert environment(name)["REDIS_URL"] == f"redis://{user}redis:6379/0"


def test_one_image_is_built_and_every_refgen_service_runs_it() -> None:
    """Compose builds each service that has ``build``: one builder, and the same image name
    everywhere, or it builds and tags the same image once per service."""
    builders = [name for name in APP_SERVICES if "build" in service(name)]
    assert builders == ["worker"] and service("worker")["build"] == "."
    images = {interpolate(service(name)["image"], {}) for name in APP_SERVICES}
    assert images == {"refgen:local"}


BACKEND_SETTINGS = {
    "REPLICATE_API_TOKEN",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_KEY",
    "GENERATOR_BACKEND",
    "STORAGE_BACKEND",
}
# What compose requires of every host (`:?`): Redis's passwords and the gateway's token secret.
REQUIRED = {
    "REDIS_PASSWORD": "test-only-redis-password",
    "GATEWAY_REDIS_PASSWORD": "test-only-gateway-redis-password",
    "GATEWAY_JWT_SECRET": "test-only-gateway-secret-0123456789abcdef",
}
HOST_SECRETS = {
    **REQUIRED,
    "REPLICATE_API_TOKEN": "r8_made_up_for_this_test_0123456789",
    "SUPABASE_URL": "https://project.supabase.co",
    "SUPABASE_SERVICE_KEY": "service-key-made-up-for-this-test",
}


def test_every_service_shares_the_base_environment() -> None:
    base = COMPOSE["x-refgen-env"]
    assert set(base) == {
        "REDIS_URL",
        "REDIS_PASSWORD",
        "ENVIRONMENT",
        "JOB_STATE_TTL_S",
        "LOG_LEVEL",
        "LOG_FORMAT",
    }
    for name in APP_SERVICES:
        env = environment(name)
        # The gateway logs in to Redis as its own user (the_gateway_may_only_read, below).
        own = {"REDIS_URL", "REDIS_PASSWORD"} if name == "gateway" else set()
        assert {k: env.get(k) for k in base if k not in own} == {
            k: v for k, v in base.items() if k not in own
        }, name


def test_the_backends_and_their_secrets_go_to_the_worker_alone() -> None:
    """Beat, Flower and the gateway need Redis only; the internet-facing gateway must never
    hold the service-role key, even when the host has every secret set."""
    assert set(environment("worker")) >= BACKEND_SETTINGS
    worker = container_env("worker", HOST_SECRETS)
    theirs = {k: v for k, v in HOST_SECRETS.items() if not k.startswith("GATEWAY_")}
    assert {k: worker[k] for k in theirs} == theirs
    for name in sorted(set(APP_SERVICES) - {"worker"}):
        env = container_env(name, HOST_SECRETS)
        assert not BACKEND_SETTINGS & set(env), name
        leaked = {k: v for k, v in HOST_SECRETS.items() if k not in REQUIRED}
        assert not any(value in env.values() for value in leaked.values()), name


def test_no_secret_is_written_in_the_file() -> None:
    seen = 0
    for name in sorted(COMPOSE["services"]):
        for key, value in environment(name).items():
            if not SECRET_NAME.search(key):
                continue
            seen += 1
            if value is None:  # passed through from the host by name
                continue
            reference = _REFERENCE.fullmatch(str(value))
            assert reference, f"{name}: {key} must come from the host (${{{key}}}), not the file"
            assert reference["name"] in (key, f"{name.upper()}_{key}"), (name, key)
            if (reference["op"] or "").endswith("-"):
                assert reference["arg"] == "", f"{name}: {key} has a literal default"
    assert seen >= 3  # the Replicate token and the Supabase key (worker), Flower's credentials
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.search(r"r8_[A-Za-z0-9]{20,}|eyJ[A-Za-z0-9_-]{20,}", text)


def test_an_unset_secret_stays_unset_instead_of_empty() -> None:
    """An empty REPLICATE_API_TOKEN is refused at start-up as a placeholder, so the backends'
    credentials are passed through by name: unset on the host, unset in the container."""
    env = container_env("worker", REQUIRED)
    for key in ("REPLICATE_API_TOKEN", "SUPABASE_SERVICE_KEY", "SUPABASE_URL"):
        assert key not in env, f"worker: {key}={env.get(key)!r} with nothing set on the host"
    host = {**REQUIRED, "REPLICATE_API_TOKEN": "r8_x"}
    assert container_env("worker", host)["REPLICATE_API_TOKEN"] == "r8_x"


def test_redis_has_a_password_that_every_service_uses() -> None:
    """Compose's Redis had none: anyone on its network could queue paid work."""
    with pytest.raises(ValueError, match="REDIS_PASSWORD"):
        container_env("worker", {})  # compose refuses to start without it
    assert "--requirepass" in " ".join(service("redis")["command"])
    assert container_env("redis", REQUIRED)["REDISCLI_AUTH"] == REQUIRED["REDIS_PASSWORD"]
    for name in sorted(set(APP_SERVICES) - {"gateway"}):
        assert container_env(name, REQUIRED)["REDIS_PASSWORD"] == REQUIRED["REDIS_PASSWORD"]
    # The gateway has its own, and never the one that may write.
    gateway = container_env("gateway", REQUIRED)
    assert gateway["REDIS_PASSWORD"] == REQUIRED["GATEWAY_REDIS_PASSWORD"]
    assert REQUIRED["REDIS_PASSWORD"] not in gateway.values()
    with pytest.raises(ValueError, match="GATEWAY_REDIS_PASSWORD"):
        container_env("redis", {"REDIS_PASSWORD": REQUIRED["REDIS_PASSWORD"]})


def test_the_gateway_needs_its_token_secret_and_alone_holds_it() -> None:
    """Compose's gateway served every job to whoever reached its port while ENVIRONMENT was
    left at development (the default): compose now refuses to start without the secret."""
    with pytest.raises(ValueError, match="GATEWAY_JWT_SECRET"):
        container_env("gateway", {k: v for k, v in REQUIRED.items() if "JWT" not in k})
    secret = REQUIRED["GATEWAY_JWT_SECRET"]
    assert container_env("gateway", REQUIRED)["GATEWAY_JWT_SECRET"] == secret
    for name in sorted(SERVICES - {"gateway"}):
        assert secret not in container_env(name, REQUIRED).values(), name


def test_flower_asks_for_basic_auth_and_never_opens_its_api() -> None:
    flower = service("flower")
    assert flower["command"] == ["refgen", "flower", "--port=5555"]
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:5555:5555"]  # loopback by default
    env = environment("flower")
    assert env["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    assert str(env.get("FLOWER_UNAUTHENTICATED_API", "false")).lower() == "false"
    for name in SERVICES - {"flower"}:
        assert "FLOWER_UNAUTHENTICATED_API" not in environment(name), name


def test_the_worker_links_to_the_gateway_and_shares_its_storage() -> None:
    gateway = service("gateway")
    assert gateway["command"] == ["refgen", "gateway", "--host", "0.0.0.0", "--port", "8000"]
    assert gateway["ports"] == ["${GATEWAY_BIND:-127.0.0.1}:8000:8000"]  # loopback by default
    public = urlparse(container_env("worker", REQUIRED)["LOCAL_STORAGE_PUBLIC_URL"])
    assert (public.scheme, public.hostname, public.port) == ("http", "localhost", 8000)

    storage_dir = container_env("worker", REQUIRED)["LOCAL_STORAGE_DIR"]
    assert container_env("gateway", REQUIRED)["LOCAL_STORAGE_DIR"] == storage_dir
    mounts = {
        name: {v.split(":")[0] for v in service(name)["volumes"] if v.endswith(f":{storage_dir}")}
        for name in ("worker", "gateway")
    }
    assert mounts["worker"] and mounts["worker"] == mounts["gateway"]
    assert mounts["worker"] <= set(COMPOSE["volumes"])


def test_beat_keeps_its_schedule_on_a_volume_and_answers_pings() -> None:
    command = service("beat")["command"]
    schedule = Path(command[command.index("--schedule") + 1])
    assert any(v.endswith(f":{schedule.parent}") for v in service("beat")["volumes"])
    assert "--enable-remote-control" in command
    hostname = command[command.index("--hostname") + 1]
    assert hostname.replace("%h", "$HOSTNAME") in healthcheck_argv(
        service("beat")["healthcheck"]["test"], {}
    )


# --- The commands are the project's entry points ---------------------------------------------


COMMANDS = project_commands()


def test_every_service_runs_a_project_command() -> None:
    commanded = {label.removesuffix("-command") for label, _ in COMMANDS if "-command" in label}
    assert commanded == set(APP_SERVICES)
    assert {"worker-healthcheck", "beat-healthcheck"} <= {label for label, _ in COMMANDS}


@pytest.mark.parametrize(("label", "argv"), COMMANDS, ids=[label for label, _ in COMMANDS])
def test_each_command_is_a_real_entry_point(label: str, argv: list[str], help_env) -> None:
    attempts = [[*ENTRY_POINTS[argv[0]], *argv[1:], "--help"]]
    if argv[:2] in (["refgen", "worker"], ["refgen", "beat"]) and len(argv) > 2:
        # refgen hands these options to Celery as they are; argparse's --help would not look.
        attempts.append([*ENTRY_POINTS["celery"], "-A", "tasks.app", *argv[1:], "--help"])
    for attempt in attempts:
        done = subprocess.run(
            attempt, cwd=ROOT, env=help_env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{shlex.join(attempt)}:\n{done.stdout}\n{done.stderr}"
        assert "usage" in done.stdout.lower()


@pytest.mark.parametrize(("name", "code"), python_healthchecks())
def test_python_healthchecks_compile(name: str, code: str) -> None:
    compile(code, f"<{name} healthcheck>", "exec")
    assert "urllib.request" in code and "127.0.0.1" in code


def test_there_are_python_healthchecks_for_flower_and_the_gateway() -> None:
    assert {name for name, _ in python_healthchecks()} == {"flower", "gateway"}


# --- The stack, run as composed --------------------------------------------------------------


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        stop_process_group(self.process)


@dataclass
class Stack:
    redis: RedisServer
    services: dict[str, Running]
    ports: dict[int, int]
    localize: Callable[[str], str]
    env: Callable[[str], dict[str, str]]
    cwd: Path


def shims(folder: Path) -> Path:
    """refgen, celery and python on PATH, as in the image, run by this interpreter."""
    folder.mkdir()
    for name, argv in {**ENTRY_POINTS, "python": [sys.executable]}.items():
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec {shlex.join(argv)} "$@"\n')
        shim.chmod(0o755)
    return folder


def compose_redis_args(host: Mapping[str, str], folder: Path) -> list[str]:
    """The arguments compose's Redis command gives redis-server, worked out by its own shell
    (the gateway user's password hashed as it is there), for a redis-server of ours."""
    folder.mkdir()
    entrypoint = folder / "docker-entrypoint.sh"
    entrypoint.write_text('#!/bin/sh\nshift\nprintf "%s\\0" "$@"\n')  # all after redis-server
    entrypoint.chmod(0o755)
    kind, flag, script = service("redis")["command"]
    assert (kind, flag) == ("sh", "-c")
    shell = subprocess.run(
        ["/bin/sh", "-c", interpolate(script, {})],
        env={"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", **container_env("redis", host)},
        capture_output=True,
        check=True,
    )
    return shell.stdout.decode().split("\0")[:-1]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    # Nothing set on the host but what compose requires and Flower's credentials: the
    # defaults, no backend credentials.
    host = {**REQUIRED, "FLOWER_BASIC_AUTH": "ops:test-only-flower-pw"}
    ports = {}
    for name in APP_SERVICES:
        for mapping in service(name).get("ports", []):
            *_, published, target = interpolate(str(mapping), host).split(":")
            ports[int(published)] = ports[int(target)] = ports.get(int(target)) or free_port()
    bin_dir = shims(tmp_path / "bin")
    redis_args = compose_redis_args(host, tmp_path / "entrypoint")

    with RedisServer(password=REQUIRED["REDIS_PASSWORD"], extra_args=redis_args) as redis_server:

        def localize(text: str) -> str:
            # Published and container ports first, before any path or port of ours is in.
            text = re.sub(r"(?<!\d)\d{4,5}(?!\d)", lambda m: str(ports.get(int(m[0]), m[0])), text)
            text = re.sub(
                r"(redis://(?:\w+@)?)redis:6379", rf"\g<1>127.0.0.1:{redis_server.port}", text
            )
            return text.replace("/data/", f"{tmp_path}/data/").replace("0.0.0.0", "127.0.0.1")

        def env(name: str) -> dict[str, str]:
            return {
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "HOME": str(tmp_path),
                "HOSTNAME": socket.gethostname(),
                "LANG": "C.UTF-8",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
                **{k: localize(v) for k, v in container_env(name, host).items()},
            }

        running: dict[str, Running] = {}
        try:
            for name in APP_SERVICES:
                for volume in service(name).get("volumes", []):
                    Path(localize(volume.split(":", 1)[1] + "/")).mkdir(parents=True, exist_ok=True)
                argv = [localize(interpolate(str(arg), host)) for arg in service(name)["command"]]
                log = tmp_path / f"{name}.log"
                with log.open("ab") as out:
                    process = subprocess.Popen(
                        argv,
                        cwd=ROOT,
                        env=env(name),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                running[name] = Running(name, process, log)
            yield Stack(redis_server, running, ports, localize, env, ROOT)
        finally:
            for process in running.values():
                process.stop()


def healthcheck(stack: Stack, name: str) -> subprocess.CompletedProcess[str]:
    check = service(name)["healthcheck"]
    kind, *rest = check["test"]
    if kind == "CMD-SHELL":
        argv = ["/bin/sh", "-c", stack.localize(interpolate(rest[0], {}))]
    else:
        argv = [stack.localize(interpolate(arg, {})) for arg in rest]
    if name == "redis":
        argv = [argv[0], "-p", str(stack.redis.port), *argv[1:]]
    try:
        return subprocess.run(
            argv,
            cwd=stack.cwd,
            env=stack.env(name),
            capture_output=True,
            text=True,
            timeout=seconds(check["timeout"]),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", "healthcheck timed out")


def wait_healthy(stack: Stack, name: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    last: subprocess.CompletedProcess[str] | None = None
    while time.monotonic() < deadline:
        running = stack.services.get(name)
        if running is not None and running.process.poll() is not None:
            pytest.fail(f"{name} exited ({running.process.returncode}):\n{running.tail()}")
        last = healthcheck(stack, name)
        if last.returncode == 0:
            return
        time.sleep(1)
    detail = stack.services[name].tail() if name in stack.services else ""
    pytest.fail(f"{name} never turned healthy: {last}\n{detail}")


def fetch(url: str, auth: str | None = None, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_the_stack_runs_as_composed(stack: Stack, load_plan) -> None:
    if shutil.which("redis-cli"):
        wait_healthy(stack, "redis", timeout_s=10)
    for name in APP_SERVICES:
        wait_healthy(stack, name)

    plan = load_plan("typical_2x2")
    run = JobRunner(stack.redis.url)(plan, timeout_s=90)
    assert run.result["status"] == "success"

    gateway = f"http://localhost:{stack.ports[8000]}"
    references = run.result["scene_references"] + run.result["character_references"]
    assert len(references) == 4
    for reference in references:
        url = reference["image_url"]
        assert url.startswith(f"{gateway}/files/"), url
        status, body = fetch(url)
        assert status == 200 and body.startswith(b"\x89PNG\r\n\x1a\n"), (status, body[:200])

    # The job's page with its token (signed with the secret compose required), none without.
    page_url = f"{gateway}/jobs/{plan['job_id']}"
    assert fetch(page_url)[0] == 401
    token = mint(
        REQUIRED["GATEWAY_JWT_SECRET"], job_id=plan["job_id"], expires=int(time.time()) + 60
    )
    status, page = fetch(page_url, token=token)
    assert status == 200 and plan["job_id"].encode() in page
    status, body = fetch(f"{gateway}/healthz")
    assert (status, json.loads(body)) == (200, {"ok": True})
    the_gateway_may_only_read(stack, gateway, plan["job_id"])

    # Flower asks for its password; its healthcheck still answers without.
    flower = f"http://127.0.0.1:{stack.ports[5555]}"
    assert fetch(f"{flower}/api/workers")[0] == 401
    assert fetch(f"{flower}/api/workers", auth=":")[0] == 401
    assert fetch(f"{flower}/")[0] == 401
    assert fetch(f"{flower}/api/workers", auth="ops:test-only-flower-pw")[0] == 200
    assert fetch(f"{flower}/healthcheck") == (200, b"OK")


def the_gateway_may_only_read(stack: Stack, gateway: str, job_id: str) -> None:
    """The gateway, logged in to compose's Redis as its own user, serves every route; that
    user is refused every write but the backlog's first-seen hash."""
    secret = REQUIRED["GATEWAY_JWT_SECRET"]
    token = mint(secret, job_id=job_id, expires=int(time.time()) + 60)
    status, replay = fetch(f"{gateway}/jobs/{job_id}/events", token=token)
    assert status == 200 and b"stage_update" in replay and b'"completed"' in replay, replay[-300:]
    operator = mint(secret, operator=True, expires=int(time.time()) + 60)
    status, index = fetch(f"{gateway}/", token=operator)
    assert status == 200 and job_id.encode() in index
    status, metrics = fetch(f"{gateway}/metrics", token=operator)
    assert status == 200 and b"refgen_" in metrics
    admin = redis.Redis.from_url(stack.redis.url)
    gateway_user = redis.Redis(
        port=stack.redis.port, username="gateway", password=REQUIRED["GATEWAY_REDIS_PASSWORD"]
    )
    try:
        assert admin.acl_log() == [], admin.acl_log()  # nothing the gateway did was refused
        assert gateway_user.exists(f"celery-task-meta-{job_id}") == 1
        writes: list[Callable[[], object]] = [
            lambda: gateway_user.set(f"refgen:job:{{{job_id}}}:meta", "x"),
            lambda: gateway_user.lpush("reference_generator", "{}"),
            lambda: gateway_user.xadd(f"refgen:events:{{{job_id}}}", {"a": "b"}),
            lambda: gateway_user.publish(f"job_events:{job_id}", "{}"),
            lambda: gateway_user.hset("refgen:metrics", "x", 1),
            lambda: gateway_user.flushall(),
            lambda: gateway_user.keys("*"),
            lambda: gateway_user.config_get("*"),
            lambda: gateway_user.eval("return redis.call('del', KEYS[1])", 1, "refgen:metrics"),
        ]
        for write in writes:
            with pytest.raises(redis.exceptions.NoPermissionError):
                write()
        assert gateway_user.hsetnx("refgen:backlog:first-seen", "t", "1") in (0, 1)
    finally:
        admin.close()
        gateway_user.close()


def test_healthchecks_fail_when_their_own_service_is_gone(stack: Stack) -> None:
    """Beat answers pings too: the worker's healthcheck must ask the worker, not anyone."""
    for name in APP_SERVICES:
        wait_healthy(stack, name)
    stack.services["worker"].stop()
    assert healthcheck(stack, "worker").returncode != 0
    assert healthcheck(stack, "beat").returncode == 0
    for name in ("beat", "flower", "gateway"):
        stack.services[name].stop()
        assert healthcheck(stack, name).returncode != 0, name


# --- The Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_the_image_installs_pinned_and_runs_as_a_user() -> None:
    steps = dockerfile_instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = [i for i, (keyword, rest) in enumerate(steps) if keyword == "RUN"]
    install = next(
        i for i in runs if re.search(r"pip install .*-c constraints\.txt \.(\s|$)", steps[i][1])
    )
    users = [i for i, (keyword, _) in enumerate(steps) if keyword == "USER"]
    assert users, "no USER: the services would run as root"
    user = steps[users[-1]][1]
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert users[-1] > install  # install as root, run as the user
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", DOCKERFILE)
    # Named volumes copy the image's ownership: the user must own what it writes.
    assert re.search(rf"chown -R {re.escape(user)}(:{re.escape(user)})? /data", DOCKERFILE)
    copied = " ".join(rest for keyword, rest in steps if keyword == "COPY")
    assert "constraints.txt" in copied


def build_context(tmp_path: Path) -> Path:
    """What the Dockerfile's COPY lines put in WORKDIR, minus what .dockerignore leaves out."""
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc")
    steps = dockerfile_instructions()
    workdir = Path(next(rest for keyword, rest in steps if keyword == "WORKDIR"))
    app = tmp_path / "image" / workdir.relative_to("/")
    app.mkdir(parents=True)
    for keyword, rest in steps:
        if keyword != "COPY":
            continue
        *sources, target = rest.split()
        assert not any(s.startswith("--") for s in sources), "COPY flags are not modelled"
        destination = app / target
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, destination, ignore=ignored)
            else:
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, destination / origin.name)
    return app


def test_the_build_context_holds_the_whole_package(tmp_path: Path) -> None:
    app = build_context(tmp_path)
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "--build-lib",
            str(out / "lib"),
            "egg_info",
            "--egg-base",
            str(out),
        ],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    built = {p.relative_to(out / "lib").as_posix() for p in (out / "lib").rglob("*")}
    for required in (
        "celeryconfig.py",
        "tasks/app.py",
        "tasks/cli.py",
        "worker/settings.py",
        "gateway/app.py",
        "gateway/job.html",
        "gateway/index.html",
        "gateway/static/job.js",
    ):
        assert required in built, f"{required} would be missing from the image"
    entry_points = next(out.glob("*.egg-info")) / "entry_points.txt"
    assert "refgen = tasks.cli:main" in entry_points.read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".git", ".venv", "tests"} <= set(ignored)
