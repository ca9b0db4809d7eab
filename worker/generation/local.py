"""A generator with no account and no network, for the demo, tests and benchmarks.

It draws a deterministic abstract picture from the prompt and the palette (no text), waits
``latency_s`` like a remote model would, and fails on request so that every path of the job
can be exercised for real.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import random
import time
import zlib
from collections.abc import Collection, Sequence
from decimal import Decimal
from pathlib import Path

from PIL import Image, ImageDraw

from worker import constants as c
from worker.errors import ContentRejectedError, ImageTimeoutError, RetryableError
from worker.generation import Bill, GeneratedImage, GenerationRequest

_DEFAULT_PALETTE = ("#1B1B3A", "#693668", "#A74482", "#F84AA7", "#FF3562")


class LocalImageGenerator:
    def __init__(
        self,
        *,
        latency_s: float = 1.0,
        cost: Decimal = c.FALLBACK_IMAGE_COST,
        fail_ids: Collection[str] = (),
        flaky_ids: Collection[str] = (),
        reject_ids: Collection[str] = (),
        journal: Path | None = None,
    ) -> None:
        self._latency_s = latency_s
        self._cost = cost
        self._fail_ids = frozenset(fail_ids)
        self._flaky_ids = frozenset(flaky_ids)
        self._reject_ids = frozenset(reject_ids)
        self._journal = journal

    def generate(self, request: GenerationRequest) -> GeneratedImage:
        """Takes ``latency_s`` in all, drawing included, as a remote model's latency includes
        its compute."""
        started = time.monotonic()
        if request.image_id in self._reject_ids:
            raise ContentRejectedError(
                "The prompt was rejected by the content filter (simulated by the local generator)"
            )
        if self._latency_s > request.deadline_s:
            time.sleep(request.deadline_s)
            raise ImageTimeoutError(f"Timed out after {request.deadline_s:g} s")
        png = render_png(request.prompt, tuple(request.palette))
        time.sleep(max(0.0, self._latency_s - (time.monotonic() - started)))
        if request.image_id in self._fail_ids or (
            request.image_id in self._flaky_ids and request.attempt == 0
        ):
            raise RetryableError(
                "The image service is temporarily unavailable (simulated by the local generator)"
            )
        if self._journal is not None:
            # One short O_APPEND write per image: whole lines even with many processes.
            line = f"{request.job_id} {request.image_key} {request.attempt} {os.getpid()}\n"
            with self._journal.open("a", encoding="utf-8") as handle:
                handle.write(line)
        return GeneratedImage(
            png=png, cost=self._cost, generation_time=round(time.monotonic() - started, 3)
        )

    def cancel_in_flight(self, job_id: str, requests: Sequence[GenerationRequest]) -> list[str]:
        return []  # nothing runs remotely, nothing is billed while it waits

    def sweep_lost(
        self, job_id: str, requests: Sequence[GenerationRequest]
    ) -> list[tuple[str, Bill]]:
        return []  # no call of it is paid remotely, so no answer of one can be lost

    def warm(self, connections: int) -> None:
        pass  # nothing to connect to


@functools.lru_cache(maxsize=128)
def render_png(prompt: str, palette: tuple[str, ...], size: int = c.IMAGE_SIZE) -> bytes:
    """Same prompt and palette, same bytes: drawn once (about 16 ms of CPU, ~5 KB kept).
    Drawing is the local stand-in's only CPU cost; a real generator's is zero."""
    colors = [_rgb(h) for h in (palette or _DEFAULT_PALETTE)]
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    top, bottom = colors[0], colors[-1] if len(colors) > 1 else _shade(colors[0])
    # Compositing two flat images through Pillow's built-in gradient is ~50× faster than
    # drawing the gradient line by line.
    mask = Image.linear_gradient("L").resize((size, size))
    image = Image.composite(
        Image.new("RGB", (size, size), bottom), Image.new("RGB", (size, size), top), mask
    )
    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randint(8, 14)):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        w, h = rng.randint(size // 12, size // 2), rng.randint(size // 12, size // 2)
        fill = (*rng.choice(colors), rng.randint(90, 200))
        box = (x0 - w // 2, y0 - h // 2, x0 + w // 2, y0 + h // 2)
        shape = rng.choice(("ellipse", "rectangle", "triangle"))
        if shape == "ellipse":
            draw.ellipse(box, fill=fill)
        elif shape == "rectangle":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (x0, box[1]), (box[2], box[3])], fill=fill)
    out = io.BytesIO()
    # Fast settings for flat art: level 1 with run-length matching encodes as fast as no
    # compression at all, and the file is ~5 KB rather than ~30 KB.
    image.save(out, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return out.getvalue()


def _rgb(hex_color: str) -> tuple[int, int, int]:
    value = hex_color.lstrip("#")
    if len(value) == 3:
        value = "".join(ch * 2 for ch in value)
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = rgb
    return r // 3, g // 3, b // 3
