"""What ``refgen run`` shows on stderr while a job runs: a bar on a terminal, lines otherwise."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

from worker import constants as c


@dataclass
class ProgressView:
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    total: int = 0
    done: int = 0
    failed: int = 0
    retries: int = 0
    cost: Decimal = Decimal(0)
    finished: bool = False

    @property
    def interactive(self) -> bool:
        return self.stream.isatty()

    def handle(self, raw: str) -> None:
        try:
            message = json.loads(raw)
            event_type, data = message["event_type"], message["data"]
        except (ValueError, KeyError, TypeError):
            return
        self._update(event_type, data)
        line = _describe(event_type, data)
        if self.interactive:
            self._draw_bar(line)
        elif line:
            print(line, file=self.stream, flush=True)

    def _update(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type == c.EVENT_STAGE_UPDATE and data.get("total_images"):
            self.total = int(data["total_images"])
        if event_type == c.EVENT_IMAGE_START:
            self.total = int(data.get("total_images", self.total))
        elif event_type == c.EVENT_IMAGE_COMPLETE:
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

    def _draw_bar(self, line: str | None) -> None:
        width = 30
        finished = self.done + self.failed
        filled = width * finished // self.total if self.total else 0
        bar = "█" * filled + "░" * (width - filled)
        if line:
            print(f"\r\x1b[2K{line}", file=self.stream)
        status = (
            f"\r\x1b[2K[{bar}] {finished}/{self.total or '?'} images"
            f"  failed {self.failed}  retries {self.retries}  ${self.cost}"
        )
        print(status, end="" if not self.finished else "\n", file=self.stream, flush=True)


def _describe(event_type: str, data: dict[str, Any]) -> str | None:
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
