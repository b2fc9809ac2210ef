"""What a waiting task's caller sees: its place in line, when it starts, its ``queued`` events.

- :class:`WaitReader` (SDK, CLI) and :class:`AsyncWaitReader` (gateway) read one task's
  position and ETA with one call of the POSITION script (O(tenants × log n), no walk over the
  backlog). The ETA needs the model's slots, summed from the workers' announcements, which a
  reader keeps for :data:`SLOTS_FRESH_S`, as long as an announcement lasts between renewals.
- :class:`QueuedNotices` decides, without I/O, when a follower shows a ``queued`` event: while
  the scheduler holds the task, at most once per :data:`QUEUED_EVERY_S`, and only when its
  position or ETA changed. Once released to the Celery queue a free slot takes it next, so the
  notices stop. Followers make these events; nothing writes them to the log
  (docs/scheduling.md, "Queued events").
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from tasks.events import queued_event
from tasks.keys import queue_name
from tasks.registry import ANNOUNCE_EVERY_S, WorkerInfo, live_workers
from tasks.scheduler import lua
from tasks.scheduler.pending import Located, Scheduler, locate_args, parse_located
from tasks.settings import Settings

QUEUED_EVERY_S = 1.0  # the shortest time between two queued events of one follower
SLOTS_FRESH_S = ANNOUNCE_EVERY_S


@dataclass(frozen=True)
class Wait:
    """Where a waiting task stands: ``position`` tasks start before it (0: next), and it starts
    in about ``eta_s`` seconds (None until the model has a measured run time and a worker)."""

    model: str
    position: int
    eta_s: float | None
    released: bool = False  # in the model's Celery queue already: a free slot takes it next


class SlotCounts:
    """Live slots per model queue, from the workers' announcements, kept for a while."""

    def __init__(self, fresh_s: float = SLOTS_FRESH_S) -> None:
        self.fresh_s = fresh_s
        self._slots: dict[str, int] = {}
        self._at = float("-inf")

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._at >= self.fresh_s

    def update(self, workers: list[WorkerInfo]) -> None:
        slots: dict[str, int] = {}
        for worker in workers:
            for queue in worker.queues:
                slots[queue] = slots.get(queue, 0) + worker.slots
        self._slots, self._at = slots, time.monotonic()

    def of(self, model: str) -> int:
        return self._slots.get(queue_name(model), 0)


def _wait(found: Located | None, slots: SlotCounts) -> Wait | None:
    if found is None:
        return None
    total = slots.of(found.model)
    eta = found.eta_s(total) if total else None  # nobody serves the model now: no estimate
    return Wait(found.model, found.position, eta, found.released)


class WaitReader:
    """Position and ETA of waiting tasks, from a synchronous client (SDK, CLI)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.scheduler = Scheduler(client, settings)
        self.slots = SlotCounts()

    def wait(self, task_id: str) -> Wait | None:
        """None once the task started or ended, or when the scheduler never had it."""
        found = self.scheduler.locate(task_id)
        if found is not None and self.slots.stale:
            self.slots.update(live_workers(self.client))
        return _wait(found, self.slots)


class AsyncWaitReader:
    """:class:`WaitReader` for asyncio (the gateway): ``workers`` lists the live workers."""

    def __init__(
        self,
        client: aioredis.Redis,
        settings: Settings,
        workers: Callable[[], Awaitable[list[WorkerInfo]]],
    ) -> None:
        self.settings = settings
        self._position = client.register_script(lua.POSITION)
        self._workers = workers
        self.slots = SlotCounts()

    async def wait(self, task_id: str) -> Wait | None:
        args = locate_args(task_id, time.time(), self.settings.priority_aging_s)
        found = parse_located(await self._position(args=args))
        if found is not None and self.slots.stale:
            self.slots.update(await self._workers())
        return _wait(found, self.slots)


class QueuedNotices:
    """When a follower of one task shows a ``queued`` event. No I/O: the follower asks
    :meth:`due`, reads the task's :class:`Wait` if so, and hands it to :meth:`take`."""

    def __init__(self, task_id: str, every_s: float = QUEUED_EVERY_S) -> None:
        self.task_id = task_id
        self.every_s = every_s
        self.over = False  # the task started (or the scheduler does not have it): stop asking
        self._next_at = float("-inf")
        self._shown: tuple[int, float | None] | None = None

    def due(self, now: float) -> bool:
        """Time to read the task's position again (``now``: a monotonic clock)."""
        return not self.over and now >= self._next_at

    def take(self, wait: Wait | None, now: float) -> dict[str, Any] | None:
        """The event to show for this reading, or None when nothing changed. A task that no
        longer waits in the scheduler (``wait`` None, or released) ends the notices."""
        self._next_at = now + self.every_s
        if wait is None or wait.released:
            self.over = True
            return None
        event = queued_event(self.task_id, wait.position, wait.eta_s)
        shown = (event["position"], event["eta_s"])
        if shown == self._shown:
            return None
        self._shown = shown
        return event

    def stop(self) -> None:
        """The task's own events began: it no longer waits."""
        self.over = True
