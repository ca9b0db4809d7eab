"""What ``refgen run`` shows on stderr while a job runs: a rich progress bar on a terminal
(images done, retries, failures, cost), and plain lines when not a terminal.

Counts are kept per image, so an event seen twice counts once, and the bar only moves
forward: what it shows is the most images ever seen finished."""

from __future__ import annotations

import json
import sys
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker import constants as c


class ProgressView:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.started = False
        self.final: dict[str, Any] | None = None  # the final stage_update's data
        self.error: dict[str, Any] | None = None  # the last error event's data
        self._outcomes: dict[str, bool] = {}  # image key -> made
        self._costs: dict[str, Decimal] = {}
        self._retries: set[tuple[str, object]] = set()
        self._completed = 0
        self._bar: Progress | None = None
        self._task: Any = None
        if self.stream.isatty():
            self._bar = Progress(
                TextColumn("[bold]images"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "failed {task.fields[failed]}  retries {task.fields[retries]}  "
                    "${task.fields[cost]}"
                ),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                # stdout carries the result JSON: the bar must never capture it.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._task = self._bar.add_task("job", total=None, failed=0, retries=0, cost="0")
            self._bar.start()

    @property
    def interactive(self) -> bool:
        return self._bar is not None

    @property
    def finished(self) -> bool:
        return self.final is not None

    @property
    def done(self) -> int:
        return sum(1 for made in self._outcomes.values() if made)

    @property
    def failed(self) -> int:
        return sum(1 for made in self._outcomes.values() if not made)

    @property
    def retries(self) -> int:
        return len(self._retries)

    @property
    def cost(self) -> Decimal:
        return sum(self._costs.values(), Decimal(0))

    @property
    def completed(self) -> int:
        """Images finished, made or failed, as the bar shows them: it never goes back."""
        return self._completed

    def say(self, line: str) -> None:
        """A line of our own, above the bar when there is one."""
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False)
        else:
            print(line, file=self.stream, flush=True)

    def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            event_type, data = message["event_type"], message["data"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(data, dict):
            return
        self._update(event_type, data)
        line = describe(event_type, data, self.error)
        if line:
            self.say(line)
        if self._bar is not None:
            self._bar.update(
                self._task,
                total=self.total,
                completed=self.completed,
                failed=self.failed,
                retries=self.retries,
                cost=str(self.cost),
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _update(self, event_type: str, data: dict[str, Any]) -> None:
        if data.get("total_images"):
            self.total = int(data["total_images"])
        key = f"{data.get('image_type')}_{data.get('image_id')}"
        if event_type == c.EVENT_IMAGE_COMPLETE:
            # The first outcome announced for an image is its outcome (the worker records one).
            if self._outcomes.setdefault(key, True):
                self._costs.setdefault(key, _money(data.get("cost")))
        elif event_type == c.EVENT_IMAGE_FAILED:
            self._outcomes.setdefault(key, False)
        elif event_type == c.EVENT_IMAGE_RETRY:
            self._retries.add((key, data.get("retry_count")))
        elif event_type == c.EVENT_ERROR:
            self.error = data
        elif event_type == c.EVENT_STAGE_UPDATE:
            if data.get("status") == "started":
                self.started = True
            elif data.get("status") in c.FINAL_STAGE_STATUSES:
                self.final = data
        self._completed = max(self._completed, len(self._outcomes))


def describe(
    event_type: str, data: dict[str, Any], error: dict[str, Any] | None = None
) -> str | None:
    image = f"{data.get('image_type')} {data.get('image_id')}"
    if event_type == c.EVENT_STAGE_UPDATE:
        if data.get("status") == "started":
            return f"started: {data.get('total_images', '?')} images"
        return summary(data, error)
    if event_type == c.EVENT_IMAGE_START:
        return f"generating {image} ({data.get('current_image')}/{data.get('total_images')})"
    if event_type == c.EVENT_IMAGE_RETRY:
        return f"retrying {image} in {data.get('retry_in_s')} s: {data.get('reason')}"
    if event_type == c.EVENT_IMAGE_COMPLETE:
        return (
            f"done {image} in {data.get('generation_time')} s, ${data.get('cost')} "
            f"({data.get('completed_images')}/{data.get('total_images')})"
        )
    if event_type == c.EVENT_IMAGE_FAILED:
        return f"failed {image}: {data.get('reason')}"
    if event_type == c.EVENT_ERROR:
        return f"error: {data.get('reason')}"
    return None


def summary(final: dict[str, Any], error: dict[str, Any] | None = None) -> str:
    """One line that says how a job ended, from its final ``stage_update`` (and the ``error``
    event before it, which holds a refusal's reason and figures)."""
    status = final.get("result_status")
    made, total = final.get("successful_images"), final.get("total_images")
    spent = f"${final.get('total_cost')}, {final.get('total_time')} s"
    reason = (error or {}).get("reason")
    if status == "refused":
        figures = error or {}
        if figures.get("estimated_cost") is not None and figures.get("limit") is not None:
            spent_before = _money(figures.get("spent"))
            return (
                f"refused for budget: {figures.get('image_count', '?')} images are estimated at "
                f"${figures['estimated_cost']}, over the job's limit of ${figures['limit']}"
                + (f" (${figures['spent']} already spent)" if spent_before else "")
                + "; nothing was generated or charged (text-only)"
            )
        return f"refused: {reason or 'see the error above'}; nothing was generated or charged"
    if status == "cancelled":
        return (
            f"cancelled: {made} of {total} images made before the cancel, {spent} "
            f"({final.get('reason') or 'no reason given'}); the result is null"
        )
    if status == "invalid":
        return f"invalid plan: {reason or 'see the error above'}; nothing was generated or charged"
    if status == "text_only":
        return (
            f"text-only: {made} of {total} images made, too few for reference images (the "
            f"rule: at least half, with a scene and a character); {spent}"
        )
    if status == "partial":
        failed = final.get("failed_images")
        return f"completed: {made}/{total} images, {spent} (partial: {failed} failed)"
    return f"{final.get('status')}: {made}/{total} images, {spent} ({status})"


def _money(value: object) -> Decimal:
    try:
        return Decimal(str(value if value is not None else "0"))
    except InvalidOperation:
        return Decimal(0)
