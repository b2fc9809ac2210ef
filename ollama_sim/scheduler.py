"""Runners, parallel slots, the pending queue, loads, eviction and keep_alive.

This follows Ollama's ``server/sched.go``:

* A request for a loaded model whose runner options match attaches at once (fast path) and then
  waits, without any bound, for one of the runner's ``num_parallel`` FIFO slots.
* Anything else (first load, reload, swap) goes through one pending queue of ``max_queue``
  entries; a full queue is an immediate 503. One loop serves the queue in order, one request at
  a time: it evicts if needed (the idle runner with the shortest keep_alive, otherwise it marks
  the shortest one keep_alive 0 and waits for it to drain), then pays the load time.
* keep_alive: the last request that sets it wins for the whole runner; the idle timer starts
  when the runner's reference count drops to zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .config import VISION_MIN_NUM_CTX, ModelSpec, SimConfig
from .golike import FOREVER_S
from .stats import EventLog, SlotMeter, Stats

SERVER_BUSY = "server busy, please try again.  maximum pending requests exceeded"


class ServerBusy(Exception):
    """The pending queue is full (HTTP 503)."""


@dataclass(frozen=True)
class RunnerOptions:
    """The load-time options whose change forces a reload."""

    num_ctx: int
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0

    def needs_reload(self, wanted: RunnerOptions) -> bool:
        return (
            self.num_ctx != wanted.num_ctx
            or self.num_batch != wanted.num_batch
            or (wanted.num_gpu != -1 and self.num_gpu != wanted.num_gpu)
            or self.main_gpu != wanted.main_gpu
            or self.use_mmap != wanted.use_mmap
            or self.num_thread != wanted.num_thread
        )

    @classmethod
    def from_options(
        cls, spec: ModelSpec, options: dict[str, Any], default_ctx: int
    ) -> RunnerOptions:
        num_ctx = int(options.get("num_ctx") or default_ctx)
        num_ctx = min(num_ctx, spec.context_length)
        if spec.has("vision"):
            num_ctx = max(num_ctx, VISION_MIN_NUM_CTX)
        use_mmap = options.get("use_mmap")
        return cls(
            num_ctx=num_ctx,
            num_batch=int(options.get("num_batch", 512)),
            num_gpu=int(options.get("num_gpu", -1)),
            main_gpu=int(options.get("main_gpu", 0)),
            use_mmap=None if use_mmap is None else bool(use_mmap),
            num_thread=int(options.get("num_thread", 0)),
        )


class SlotPool:
    """``size`` FIFO slots; waiting is unbounded and ends only by cancellation."""

    def __init__(self, size: int, meter: SlotMeter) -> None:
        self.size = size
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._meter = meter
        meter.set_busy(0, size)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> None:
        if self.busy < self.size and not self._waiters:
            self.busy += 1
            self._meter.set_busy(self.busy, self.size)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: busy stays the same
                return
        self.busy -= 1
        self._meter.set_busy(self.busy, self.size)


class Runner:
    """One loaded (or loading) model."""

    def __init__(
        self,
        spec: ModelSpec,
        options: RunnerOptions,
        keep_alive_s: float,
        slots: int,
        meter: SlotMeter,
    ) -> None:
        self.spec = spec
        self.options = options
        self.keep_alive_s = keep_alive_s
        self.refcount = 0
        self.loading = True
        self.expiring = False
        self.expires_at = time.time() + keep_alive_s
        self.slots = SlotPool(slots, meter)
        self.unloaded = asyncio.Event()
        self.timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        return self.refcount == 0 and not self.loading


@dataclass
class _Pending:
    spec: ModelSpec
    options: RunnerOptions
    keep_alive_s: float | None
    future: asyncio.Future[Runner]
    request_id: str | None


class Scheduler:
    """Owns every runner. Call ``acquire``/``release`` around each request's use of a model."""

    def __init__(self, config: SimConfig, stats: Stats, events: EventLog) -> None:
        self.config = config
        self.stats = stats
        self.events = events
        self.runners: dict[str, Runner] = {}
        self._pending: deque[_Pending] = deque()
        self._processing = False
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._pending_loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for runner in list(self.runners.values()):
            if runner.timer:
                runner.timer.cancel()

    def pending_by_model(self) -> dict[str, int]:
        """Queued (not yet served) load requests per model."""
        counts: dict[str, int] = {}
        for item in self._pending:
            if not item.future.done():
                counts[item.spec.name] = counts.get(item.spec.name, 0) + 1
        return counts

    @property
    def pending(self) -> int:
        return sum(1 for p in self._pending if not p.future.done()) + int(self._processing)

    # --- requests ------------------------------------------------------------------------------

    async def acquire(
        self,
        spec: ModelSpec,
        options: RunnerOptions,
        keep_alive_s: float | None,
        request_id: str | None = None,
    ) -> Runner:
        """Return a loaded runner with this request attached (refcount held)."""
        runner = self.runners.get(spec.name)
        if (
            runner
            and not runner.loading
            and not runner.expiring
            and not runner.options.needs_reload(options)
        ):
            self._attach(runner, keep_alive_s)
            return runner
        if len(self._pending) >= self.config.max_queue:
            self._pending = deque(p for p in self._pending if not p.future.done())
            if len(self._pending) >= self.config.max_queue:
                self.stats.rejected_503 += 1
                self.events.emit("reject", model=spec.name, request_id=request_id)
                raise ServerBusy(SERVER_BUSY)
        future: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(spec, options, keep_alive_s, future, request_id))
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, runner: Runner) -> None:
        """Detach a request; the idle timer starts when the last one leaves."""
        runner.refcount -= 1
        if runner.refcount > 0:
            return
        self._start_idle(runner)

    def expire(self, spec: ModelSpec) -> None:
        """Unload ``spec`` once idle (the ``keep_alive: 0`` load/unload request)."""
        runner = self.runners.get(spec.name)
        if runner:
            self._mark_expiring(runner)

    def unload_all(self) -> None:
        for runner in list(self.runners.values()):
            self._mark_expiring(runner)

    def loaded_models(self) -> list[Runner]:
        """Runners for ``/api/ps``: the longest remaining time first."""
        return sorted(self.runners.values(), key=lambda r: r.expires_at, reverse=True)

    # --- internals -----------------------------------------------------------------------------

    def _attach(self, runner: Runner, keep_alive_s: float | None) -> None:
        runner.refcount += 1
        if runner.timer:
            runner.timer.cancel()
            runner.timer = None
        if keep_alive_s is not None:
            runner.keep_alive_s = keep_alive_s

    def _start_idle(self, runner: Runner) -> None:
        runner.expires_at = time.time() + runner.keep_alive_s
        if runner.expiring or runner.keep_alive_s <= 0:
            self._unload(runner)
        elif runner.keep_alive_s != FOREVER_S:
            loop = asyncio.get_running_loop()
            runner.timer = loop.call_later(runner.keep_alive_s, self._on_timer, runner)

    def _on_timer(self, runner: Runner) -> None:
        runner.timer = None
        if runner.idle:
            self._unload(runner)

    def _mark_expiring(self, runner: Runner) -> None:
        runner.expiring = True
        runner.keep_alive_s = 0.0
        if runner.idle:
            self._unload(runner)

    def _unload(self, runner: Runner) -> None:
        if self.runners.get(runner.spec.name) is not runner:
            return
        if runner.timer:
            runner.timer.cancel()
            runner.timer = None
        del self.runners[runner.spec.name]
        self.stats.unloads += 1
        self.stats.meter(runner.spec.name).set_loaded(False)
        self.events.emit("unload", model=runner.spec.name)
        runner.unloaded.set()

    async def _pending_loop(self) -> None:
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            item = self._pending.popleft()
            if item.future.done():
                continue  # the client went away while queued
            self._processing = True
            try:
                runner = await self._obtain(item)
                self._attach(runner, item.keep_alive_s)
                if item.future.done():
                    self.release(runner)  # loaded for nobody: start its idle timer
                else:
                    item.future.set_result(runner)
            except Exception as exc:  # surfaced to the waiting request
                if not item.future.done():
                    item.future.set_exception(exc)
            finally:
                self._processing = False

    async def _obtain(self, item: _Pending) -> Runner:
        while True:
            runner = self.runners.get(item.spec.name)
            if runner and not runner.expiring and not runner.options.needs_reload(item.options):
                return runner
            if runner:
                self._mark_expiring(runner)  # reload with other options: drain, unload
                await runner.unloaded.wait()
                continue
            if len(self.runners) >= self.config.max_loaded_models:
                victim = self._pick_victim()
                self.stats.evictions += 1
                self.events.emit(
                    "evict",
                    model=victim.spec.name,
                    for_model=item.spec.name,
                    busy=victim.refcount > 0,
                )
                self._mark_expiring(victim)
                await victim.unloaded.wait()
                continue
            return await self._load(item)

    def _pick_victim(self) -> Runner:
        ordered = sorted(self.runners.values(), key=lambda r: (r.keep_alive_s, r.spec.name))
        for runner in ordered:
            if runner.idle:
                return runner
        return ordered[0]

    async def _load(self, item: _Pending) -> Runner:
        spec = item.spec
        slots = 1 if spec.has("embedding") else self.config.num_parallel
        keep_alive = self.config.keep_alive_s if item.keep_alive_s is None else item.keep_alive_s
        meter = self.stats.meter(spec.name)
        runner = Runner(spec, item.options, keep_alive, slots, meter)
        self.runners[spec.name] = runner
        self.stats.loads += 1
        meter.loads += 1
        self.events.emit(
            "load", model=spec.name, request_id=item.request_id, num_ctx=item.options.num_ctx
        )
        try:
            await asyncio.sleep(self.config.delay(spec.load_s))
        except BaseException:
            del self.runners[spec.name]
            raise
        runner.loading = False
        runner.expires_at = time.time() + runner.keep_alive_s
        meter.set_loaded(True)
        self.events.emit("loaded", model=spec.name, request_id=item.request_id)
        return runner
