"""One call for many callers: items that threads submit under the same key go out together.

Each caller (a task's thread) hands its items to the :class:`Batcher` and waits. One sender
thread per *lane* (a model, for embeddings) takes the oldest waiting request, adds the requests
behind it that share its *key* (the same call parameters) while they fit in ``max_items``, makes
one call for all of them, and wakes each caller with its own share of the results. Nothing
waits for a batch to fill: a lane sends as soon as its previous call returns, so a lone request
goes out at once, and under load a batch gathers while the call before it runs.

A caller keeps everything else of its own: it may stop waiting at any moment (``check`` raises),
which takes its request out of the queue, or drops its share if the call was already sent. A
waiting caller sleeps until its call returns or its ``wake`` event is set (a cancel), running
``check`` then and at least every ``poll_s``: hundreds of callers waiting on one call cost no
wake-ups of their own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")  # an item
R = TypeVar("R")  # one item's result

POLL_S = 0.25  # how often a waiting caller runs its ``check``

# One call: every item of the batch, in order -> one result per item, and what else it answered.
Send = Callable[[list[T]], tuple[list[R], Any]]


@dataclass(frozen=True)
class Work(Generic[T, R]):
    """What requests share a batch, and how a batch is sent."""

    lane: Hashable  # at most one call in flight per lane
    key: Hashable  # only requests with equal keys share a call (equal call parameters)
    send: Send[T, R]
    # A failure of a shared call that belongs to one request's items rather than to the call:
    # each request of the batch is then sent again alone, so it fails only its own caller.
    isolate: Callable[[BaseException], bool] = field(default=lambda exc: False)


@dataclass(frozen=True)
class Batch(Generic[T, R]):
    """One call as made: all its items, their results, and what else the call answered."""

    items: list[T]
    results: list[R]
    info: Any


@dataclass(frozen=True)
class Share(Generic[T, R]):
    """One request's part of a batch: ``batch.items[start:end]`` are its items."""

    batch: Batch[T, R]
    start: int
    end: int

    @property
    def results(self) -> list[R]:
        return self.batch.results[self.start : self.end]


@dataclass(eq=False)
class _Request(Generic[T, R]):
    work: Work[T, R]
    items: list[T]
    wake: threading.Event  # its caller's: set once the outcome is in
    outcome: Share[T, R] | BaseException | None = None

    def settle(self, outcome: Share[T, R] | BaseException) -> None:
        self.outcome = outcome
        self.wake.set()


class Batcher:
    """Gathers the requests of many threads into calls of at most ``max_items`` items."""

    def __init__(self, max_items: int, *, name: str = "batcher") -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.max_items = max_items
        self.name = name
        self._lock = threading.Lock()
        self._queues: dict[Hashable, deque[_Request[Any, Any]]] = {}
        self._ready: dict[Hashable, threading.Condition] = {}

    def gather(
        self,
        work: Work[T, R],
        parts: Sequence[Sequence[T]],
        check: Callable[[], None] = lambda: None,
        *,
        poll_s: float = POLL_S,
        wake: threading.Event | None = None,
    ) -> list[Share[T, R] | BaseException]:
        """Submit each part (at most ``max_items`` items each) and wait for all of them.

        Returns each part's share, or the exception its call raised, in order. ``check`` is
        called while waiting: whenever ``wake`` is set (by the caller's side, e.g. on a cancel;
        the batcher sets it too as each part's outcome comes in), and at least every ``poll_s``.
        Whatever it raises leaves at once, after the parts still queued are withdrawn (a part
        already sent is dropped when its call returns).
        """
        return self.gather_each([(work, part) for part in parts], check, poll_s=poll_s, wake=wake)

    def gather_each(
        self,
        parts: Sequence[tuple[Work[T, R], Sequence[T]]],
        check: Callable[[], None] = lambda: None,
        *,
        poll_s: float = POLL_S,
        wake: threading.Event | None = None,
    ) -> list[Share[T, R] | BaseException]:
        """:meth:`gather` for parts that each name their own work (their own call parameters)."""
        if any(len(part) > self.max_items for _, part in parts):
            raise ValueError(f"a part holds more than max_items={self.max_items} items")
        wake = threading.Event() if wake is None else wake
        requests = [_Request(work, list(part), wake) for work, part in parts]
        with self._lock:
            for request in requests:
                self._lane(request.work.lane).append(request)
            for lane in {request.work.lane for request in requests}:
                self._ready[lane].notify()
        try:
            while True:
                wake.clear()  # before looking: an outcome or a cancel after this sets it again
                if all(request.outcome is not None for request in requests):
                    break
                check()
                wake.wait(poll_s)
        except BaseException:
            self._withdraw(requests)
            raise
        return [_outcome(request) for request in requests]

    def waiting(self, lane: Hashable) -> int:
        """Requests of ``lane`` waiting for a call (not counting the one in flight)."""
        with self._lock:
            return len(self._queues.get(lane, ()))

    def _lane(self, lane: Hashable) -> deque[_Request[Any, Any]]:
        """The lane's queue; its sender thread starts with it (called under the lock)."""
        if lane not in self._queues:
            self._queues[lane] = deque()
            self._ready[lane] = threading.Condition(self._lock)
            name = f"{self.name}:{lane}"
            threading.Thread(target=self._serve, args=(lane,), name=name, daemon=True).start()
        return self._queues[lane]

    def _withdraw(self, requests: list[_Request[Any, Any]]) -> None:
        with self._lock:
            for request in requests:
                queue = self._queues[request.work.lane]
                if request in queue:
                    queue.remove(request)

    def _serve(self, lane: Hashable) -> None:
        """The lane's sender: one call at a time, for as long as the process lives."""
        queue, ready = self._queues[lane], self._ready[lane]
        while True:
            with self._lock:
                while not queue:
                    ready.wait()
                batch = self._take(queue)
            self._send(batch)

    def _take(self, queue: deque[_Request[Any, Any]]) -> list[_Request[Any, Any]]:
        """The oldest request, and the later ones with its key that still fit (under the lock)."""
        first = queue.popleft()
        batch, size = [first], len(first.items)
        for request in list(queue):
            if size >= self.max_items:
                break
            if request.work.key == first.work.key and size + len(request.items) <= self.max_items:
                queue.remove(request)
                batch.append(request)
                size += len(request.items)
        return batch

    def _send(self, requests: list[_Request[Any, Any]]) -> None:
        work = requests[0].work
        try:
            self._call(work, requests)
        except Exception as exc:
            if len(requests) > 1 and work.isolate(exc):
                for request in requests:
                    self._send([request])
                return
            self._deliver(requests, exc)

    def _call(self, work: Work[Any, Any], requests: list[_Request[Any, Any]]) -> None:
        items = [item for request in requests for item in request.items]
        results, info = work.send(items)
        if len(results) != len(items):
            raise ValueError(f"the call answered {len(results)} results for {len(items)} items")
        batch = Batch(items, list(results), info)
        start = 0
        for request in requests:
            end = start + len(request.items)
            request.settle(Share(batch, start, end))
            start = end

    @staticmethod
    def _deliver(requests: list[_Request[Any, Any]], error: BaseException) -> None:
        for request in requests:
            request.settle(error)


def _outcome(request: _Request[T, R]) -> Share[T, R] | BaseException:
    if request.outcome is None:  # gather returns once every outcome is in: unreachable
        raise RuntimeError("a batch request ended without an outcome")
    return request.outcome
