"""Which waiting task a free slot takes next, across jobs: smaller jobs first.

On the Redis broker every priority level of a queue is a list of its own, and a worker with a
free slot pops the first message of the first non-empty list (kombu's ``BRPOP`` over
``priority_steps``, 0 first). With one message prefetched per slot, the choice is made at the
moment a slot frees, among everything waiting then. So a message's priority decides whom a
slot serves:

- ``start``, ``finalize`` and retries go at the top. They are short, and each unblocks a whole
  job: a job's result waits for its ``finalize``, and a retry is due 2 s after its first
  attempt, not after the queue that formed meanwhile.
- an image goes at its job's *size class*: 1 image, 2, 3–4, 5–8, 9–16, ... (levels 1–9). A job
  waits for the jobs of its own class or smaller that are ahead of it, never for a larger one
  queued before it; within a class, first come first served.

This is shortest-job-first in classes of doubling size. It was measured against serving
images round-robin by their position in their job (every job's first image, then every
job's second, ...) and against a feedback queue (every job's first four images, then the
next four, then eight, ...). Both make small jobs wait longer: the first serves every job's
first image before any job's second, the second serves the large job's first four images
alongside the small jobs' (README: Performance, Fairness under load). Its price: a large job
also waits for smaller jobs that arrive after it. **Aging** bounds that wait: a level whose next
image has waited ``REFERENCE_GEN_AGING_S`` at the head of its list without being served rises a
level (``queue_age.lua``), so a starved job climbs to level 1 within (its level − 1) periods and
is then served ahead of the stream of 2-image jobs (level 2) that starved it.
"""

from __future__ import annotations

import redis
import structlog

from worker import constants as c
from worker.backlog import priority_lists
from worker.scripts import register

log = structlog.get_logger(__name__)


def image_priority(job_images: int) -> int:
    """The priority of each image of a job of ``job_images`` images: 1 for a job of one image,
    then one level more each time the size doubles (2, 3–4, 5–8, ...), at most the lowest."""
    size_class = (max(job_images, 1) - 1).bit_length()
    return min(c.PRIORITY_TOP + 1 + size_class, c.PRIORITY_LOWEST)


class QueueAging:
    """Raises a starved priority level of each queue (``queue_age.lua``), on the Redis clock."""

    def __init__(self, client: redis.Redis, queues: list[str], period_s: float) -> None:
        self._age = register(client, "queue_age")
        self._queues = queues
        self._period_s = period_s

    def patrol(self) -> int:
        """Messages moved up a level, over every queue."""
        moved = 0
        for queue in self._queues:
            lists = priority_lists(queue)[1:]  # level 0 is never joined
            moved += int(
                self._age(
                    keys=[c.aging_first_seen(queue), *lists],
                    args=[self._period_s, c.QUEUE_AGING_MOST],
                )
            )
        return moved

    def step(self) -> None:
        moved = self.patrol()
        if moved:
            log.info("queue_level_aged", moved=moved)
