"""The ``refgen`` command (SPEC §11)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from worker.errors import ConfigurationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refgen", description="Reference-image worker of the music-video pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser(
        "worker",
        help="run a Celery worker for these tasks",
        description="Run a Celery worker. Other options (--hostname, --concurrency, --pool, "
        "...) go to `celery worker` as they are.",
    )

    commands.add_parser(
        "beat",
        help="run Celery beat: the hourly retention purge",
        description="Run Celery beat. Other options go to `celery beat` as they are.",
    )

    run = commands.add_parser("run", help="enqueue one job and wait for its result")
    run.add_argument("plan", type=Path, help="a ScenePlan JSON file")
    run.add_argument(
        "--duration-seconds",
        type=float,
        default=None,
        help="video length; sets the budget (duration / 60 × $200)",
    )
    run.add_argument("--job-id", default=None, help="override the plan's job_id")
    run.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the result (default 900)"
    )

    gateway = commands.add_parser(
        "gateway",
        help="serve job events (SSE, with replay), the job pages, the index and /metrics",
    )
    gateway.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    gateway.add_argument("--port", type=int, default=8000, help="port (default 8000)")

    demo = commands.add_parser("demo", help="a sample plan end to end on the local backends")
    demo.add_argument("--plan", type=Path, default=None, help="another plan to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("worker", "beat"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _dispatch(args, extra)
    except (ConfigurationError, ValidationError) as exc:
        print(f"refgen: configuration error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"refgen: {exc}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, celery_args: list[str]) -> int:
    from worker.settings import get_settings

    settings = get_settings()
    if args.command == "worker":
        from tasks.app import app

        argv = [
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

        app.start(["beat", "--loglevel", settings.log_level, *celery_args])
        return 0
    if args.command == "run":
        from tasks.client import RunRequest, run

        return run(
            RunRequest(args.plan, args.duration_seconds, args.job_id, args.timeout), settings
        )
    if args.command == "gateway":
        from gateway.server import serve

        serve(settings, host=args.host, port=args.port)
        return 0
    from tasks.demo import DEFAULT_PLAN, demo

    return demo(args.plan or DEFAULT_PLAN)


if __name__ == "__main__":
    sys.exit(main())
