"""The gateway's server-rendered pages: the index of recent jobs and the 503 page.

The page templates are package data, read once when the app is built (``load_templates``): a
gateway whose installation lacks one refuses to start rather than answer 500 to every viewer.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from urllib.parse import quote

from worker import constants as c
from worker.errors import InstallationError
from worker.job_index import JobSummary

TEMPLATES = ("index.html", "job.html")
# The pages' scripts and styles, served from /static/: the CSP allows no inline ones.
STATIC = {"job.js": "text/javascript", "job.css": "text/css", "index.css": "text/css"}

_LABELS = {
    "running": "running",
    "success": "success",
    "partial": "partial",
    "text_only": "text-only",
    "invalid": "invalid plan",
    "refused": "refused",
    "cancelled": "cancelled",
}


def escape(text: str) -> str:
    return html.escape(text, quote=True)


def index_page(
    jobs: list[JobSummary],
    now: float | None = None,
    link_token: Callable[[str], str] | None = None,
) -> str:
    """``link_token`` gives each job's link a token for that job alone (tokens on): the
    operator's own token is never copied into a link."""
    now = time.time() if now is None else now
    rows = "\n".join(_row(job, now, link_token) for job in jobs) or (
        '<tr><td colspan="6" class="empty" data-testid="no-jobs">No jobs in the last '
        f"{c.JOB_INDEX_TTL_S // 3600} hours.</td></tr>"
    )
    return (
        template("index.html")
        .replace("{{ROWS}}", rows)
        .replace("{{MAX}}", str(c.JOB_INDEX_MAX_ENTRIES))
        .replace("{{HOURS}}", str(c.JOB_INDEX_TTL_S // 3600))
    )


@cache
def template(name: str) -> str:
    """The text of one of ``TEMPLATES``. Raises ``InstallationError`` when it is missing."""
    try:
        return resources.files("gateway").joinpath(name).read_text("utf-8")
    except OSError as exc:
        raise InstallationError(f"gateway/{name}", exc) from None


def load_templates() -> None:
    for name in TEMPLATES:
        template(name)
    for name in STATIC:
        template(f"static/{name}")


def _row(job: JobSummary, now: float, link_token: Callable[[str], str] | None) -> str:
    job_id = escape(job.job_id)
    link = f"/jobs/{job_id}"
    if link_token is not None:
        link += "?token=" + escape(quote(link_token(job.job_id), safe=""))
    status = escape(job.status)
    label = escape(_LABELS.get(job.status, job.status))
    if job.total_images is None or job.status in ("refused", "invalid"):
        images = "–"
    elif job.status == "running":
        images = f"{job.total_images} planned"
    else:
        images = f"{job.successful_images or 0}/{job.total_images}"
    cost = f"${escape(job.total_cost)}" if job.total_cost is not None else "–"
    took = f"{job.total_time:g} s" if job.total_time is not None else "–"
    return (
        f'<tr data-testid="job" data-job-id="{job_id}" data-status="{status}">'
        f'<td><a href="{link}">{job_id}</a></td>'
        f'<td><span class="status {status}">{label}</span></td>'
        f'<td class="num" data-testid="images">{images}</td>'
        f'<td class="num" data-testid="cost">{cost}</td>'
        f"<td>{_when(job.first_seen, now)}</td>"
        f'<td class="num">{took}</td></tr>'
    )


def _when(at: float | None, now: float) -> str:
    if at is None:
        return "–"
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ago = max(0.0, now - at)
    if ago < 60:
        relative = f"{ago:.0f} s ago"
    elif ago < 3600:
        relative = f"{ago / 60:.0f} min ago"
    else:
        relative = f"{ago / 3600:.1f} h ago"
    return f'<time datetime="{stamp}" title="{stamp}">{relative}</time>'


def unavailable_page(message: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="5"><title>Unavailable</title></head>'
        f"<body><h1>Temporarily unavailable</h1><p>{escape(message)}</p>"
        "<p>This page reloads itself every 5 seconds.</p></body></html>"
    )
