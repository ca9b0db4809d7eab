"""The ``refgen`` command (SPEC §11)."""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from tasks import exit_codes as ex
from worker import constants as c
from worker.errors import ConfigurationError, InstallationError

if TYPE_CHECKING:
    from worker.settings import Settings


def _job_id(value: str) -> str:
    if value == "new":
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a UUID (such as 550e8400-e29b-41d4-a716-446655440000) or 'new'"
        ) from None


def _any_job_id(value: str) -> str:
    if not re.fullmatch(c.ID_PATTERN, value):
        raise argparse.ArgumentTypeError(
            f"{value[:80]!r} is not a job id: ids are letters, digits, '-' and '_', at most 64"
        )
    return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> float:
    found = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", value.strip())
    if not found or float(found[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{value[:40]!r} is not a duration such as 90s or 15m")
    return float(found[1]) * _UNITS[found[2] or "s"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refgen", description="Reference-image worker of the music-video pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "worker",
        help="run a Celery worker for these tasks",
        description="Run a Celery worker. Other options (--hostname, --concurrency, --pool, "
        "...) go to `celery worker` as they are. It refuses to start without the credentials "
        "of the backends it would use (exit 5).",
    )

    commands.add_parser(
        "beat",
        help="run Celery beat: the hourly retention purge",
        description="Run Celery beat. Other options go to `celery beat` as they are.",
    )

    commands.add_parser(
        "flower",
        help="run Flower, only with credentials that close it (FLOWER_BASIC_AUTH)",
        description="Run Flower (celery flower). It refuses to start (exit 5) unless "
        "FLOWER_BASIC_AUTH holds user:password pairs with both parts non-empty. Other options "
        "(--port=5555, --address=...) go to Flower as they are.",
    )

    run = commands.add_parser(
        "run",
        help="enqueue one job and wait for its result",
        description="Enqueue one job, show its progress on stderr and print its result JSON "
        "(or null) on stdout. A job id that already has a result is not run again: its result "
        "is shown, with the command that runs the plan again under a fresh id.",
        epilog=ex.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("plan", type=Path, help="a ScenePlan JSON file")
    run.add_argument(
        "--duration-seconds",
        type=float,
        default=None,
        help="video length; sets the budget (duration / 60 × $200)",
    )
    run.add_argument(
        "--job-id",
        type=_job_id,
        default=None,
        metavar="UUID|new",
        help="run under this job id instead of the plan's; it must be a UUID, or 'new' for a "
        "fresh one (the way to run a plan again once its job id has a result)",
    )
    run.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the result (default 900)"
    )

    cancel = commands.add_parser(
        "cancel",
        help="cancel a job: stop paying for it and end it cancelled",
        description="Send reference_generator.cancel for a job and wait for a worker's answer. "
        "A running job stops paying at once (its predictions in flight are cancelled and their "
        "run time charged, its queued images skipped) and ends cancelled with a null result; "
        "a job not started yet never starts; a job that has ended is not changed. The answer "
        "is a line on stderr and its JSON on stdout.",
        epilog=ex.describe(ex.CANCEL_MEANINGS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cancel.add_argument("job_id", type=_any_job_id, help="the job's id")
    cancel.add_argument(
        "--reason", default=None, help="why, for the job's events (default: by an operator)"
    )
    cancel.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a worker's answer (default 60)",
    )

    gateway = commands.add_parser(
        "gateway",
        help="serve job events (SSE, with replay), the job pages, the index and /metrics",
    )
    gateway.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=8000, help="port (default 8000)")

    token = commands.add_parser(
        "token",
        help="print a gateway token for a job's page and stream, or an operator's",
        description="Print a JWT signed with the first secret of GATEWAY_JWT_SECRET: for one "
        "job (its page and stream), or with --operator for every job, the index and /metrics.",
    )
    token.add_argument("job_id", nargs="?", type=_any_job_id, help="the job's id")
    token.add_argument(
        "--ttl",
        type=_duration,
        default=15 * 60,
        metavar="15m",
        help="how long the token is valid: seconds, or 90s, 15m, 12h, 7d (default 15m)",
    )
    token.add_argument("--operator", action="store_true", help="an operator's token")

    demo = commands.add_parser("demo", help="a sample plan end to end on the local backends")
    demo.add_argument("--plan", type=Path, default=None, help="another plan to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("worker", "beat", "flower"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args, extra)
    except ValidationError as exc:
        print(f"refgen: configuration error: {_one_line(exc)}", file=sys.stderr)
        return ex.CONFIGURATION
    except InstallationError as exc:
        print(f"refgen: broken installation: {exc.reason}", file=sys.stderr)
        return ex.CONFIGURATION
    except ConfigurationError as exc:
        print(f"refgen: configuration error: {exc.reason}", file=sys.stderr)
        return ex.CONFIGURATION
    except KeyboardInterrupt:
        print("refgen: interrupted", file=sys.stderr)
        return ex.INTERRUPTED
    except RuntimeError as exc:
        print(f"refgen: {exc}", file=sys.stderr)
        return 1


def _one_line(error: ValidationError) -> str:
    """Pydantic's report on the settings, as one line naming the environment variables."""
    problems = []
    for item in error.errors(include_url=False):
        name = "_".join(str(part) for part in item.get("loc", ())).upper() or "settings"
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(f"{name} {message}")
    return "; ".join(problems)


def _dispatch(args: argparse.Namespace, celery_args: list[str]) -> int:
    from worker.settings import get_settings

    settings = get_settings()
    if args.command == "worker":
        # The one process that uses the generator and the store checks their settings here,
        # before it takes a task; the others never need the credentials.
        from tasks.app import app, check_worker_can_run

        check_worker_can_run(settings)

        # JSON lines only: Celery's banner is printed, not logged.
        quiet = ["--quiet"] if settings.log_format == "json" else []
        argv = [
            *quiet,
            "worker",
            "--queues",
            ",".join(settings.reference_gen_queues),
            "--loglevel",
            settings.log_level,
            *celery_args,
        ]
        app.worker_main(argv)
        return 0
    if args.command == "beat":
        from tasks.app import app

        quiet = ["--quiet"] if settings.log_format == "json" else []
        app.start([*quiet, "beat", "--loglevel", settings.log_level, *celery_args])
        return 0
    if args.command == "flower":
        from tasks.flower import run_flower

        return run_flower(settings, celery_args)
    if args.command == "run":
        from tasks.client import RunRequest, run

        return run(
            RunRequest(args.plan, args.duration_seconds, args.job_id, args.timeout), settings
        )
    if args.command == "cancel":
        from tasks.cancel_command import cancel

        return cancel(args.job_id, args.reason, args.timeout, settings)
    if args.command == "token":
        return _print_token(args, settings)
    if args.command == "gateway":
        from gateway.server import serve

        serve(settings, host=args.host, port=args.port)
        return 0
    from tasks.demo import DEFAULT_PLAN, demo

    return demo(args.plan or DEFAULT_PLAN)


def _print_token(args: argparse.Namespace, settings: Settings) -> int:
    from gateway.auth import mint

    if (args.job_id is None) == (not args.operator):
        print("refgen token: give a job id, or --operator (not both)", file=sys.stderr)
        return ex.INVALID
    if not settings.gateway_jwt_secrets:
        raise ConfigurationError("GATEWAY_JWT_SECRET is not set: there is nothing to sign with")
    print(
        mint(
            settings.gateway_jwt_secrets[0],
            job_id=args.job_id,
            operator=args.operator,
            ttl_s=args.ttl,
        )
    )
    return ex.RESULT


if __name__ == "__main__":
    sys.exit(main())
