"""What ``refgen run`` shows on stderr while a job runs: a rich progress bar on a terminal
(images done, retries, failures, cost), and plain lines when not a terminal."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from worker import constants as c


class ProgressView:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total: int | None = None
        self.done = self.failed = self.retries = 0
        self.cost = Decimal(0)
        self.finished = False
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

    def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            event_type, data = message["event_type"], message["data"]
        except (ValueError, KeyError, TypeError):
            return
        self._update(event_type, data)
        line = describe(event_type, data)
        if self._bar is not None:
            if line:
                self._bar.console.print(line, highlight=False, markup=False)
            self._bar.update(
                self._task,
                total=self.total,
                completed=self.done + self.failed,
                failed=self.failed,
                retries=self.retries,
                cost=str(self.cost),
            )
        elif line:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def _update(self, event_type: str, data: dict[str, Any]) -> None:
        if data.get("total_images"):
            self.total = int(data["total_images"])
        if event_type == c.EVENT_IMAGE_COMPLETE:
            self.done += 1
            self.cost += Decimal(str(data.get("cost", "0")))
        elif event_type == c.EVENT_IMAGE_FAILED:
            self.failed += 1
        elif event_type == c.EVENT_IMAGE_RETRY:
            self.retries += 1
        elif event_type == c.EVENT_ERROR or (
            event_type == c.EVENT_STAGE_UPDATE and data.get("status") in ("completed", "failed")
        ):
            self.finished = True


def describe(event_type: str, data: dict[str, Any]) -> str | None:
    image = f"{data.get('image_type')} {data.get('image_id')}"
    if event_type == c.EVENT_STAGE_UPDATE:
        if data.get("status") == "started":
            return f"started: {data.get('total_images', '?')} images"
        return (
            f"{data.get('status')}: {data.get('successful_images')}/"
            f"{data.get('total_images')} images, ${data.get('total_cost')}, "
            f"{data.get('total_time')} s ({data.get('result_status')})"
        )
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
