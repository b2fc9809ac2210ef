"""Counters and the event log behind ``/_sim/stats`` and ``/_sim/events``."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any


class SlotMeter:
    """Integrates slot occupancy of one model over time (busy and saturated seconds)."""

    def __init__(self) -> None:
        self.loads = 0
        self.busy_slot_seconds = 0.0
        self.all_slots_busy_seconds = 0.0
        self.loaded_seconds = 0.0
        self._busy = 0
        self._slots = 0
        self._loaded_since: float | None = None
        self._last = time.monotonic()

    def _advance(self) -> float:
        now = time.monotonic()
        elapsed = now - self._last
        self._last = now
        self.busy_slot_seconds += self._busy * elapsed
        if self._slots and self._busy >= self._slots:
            self.all_slots_busy_seconds += elapsed
        return now

    def set_busy(self, busy: int, slots: int) -> None:
        self._advance()
        self._busy, self._slots = busy, slots

    def set_loaded(self, loaded: bool) -> None:
        now = self._advance()
        if loaded and self._loaded_since is None:
            self._loaded_since = now
        elif not loaded and self._loaded_since is not None:
            self.loaded_seconds += now - self._loaded_since
            self._loaded_since = None

    def snapshot(self) -> dict[str, float | int]:
        now = self._advance()
        loaded = self.loaded_seconds
        if self._loaded_since is not None:
            loaded += now - self._loaded_since
        return {
            "loads": self.loads,
            "busy_slot_seconds": round(self.busy_slot_seconds, 6),
            "all_slots_busy_seconds": round(self.all_slots_busy_seconds, 6),
            "loaded_seconds": round(loaded, 6),
        }

    def reset(self) -> None:
        now = self._advance()
        self.loads = 0
        self.busy_slot_seconds = self.all_slots_busy_seconds = self.loaded_seconds = 0.0
        if self._loaded_since is not None:
            self._loaded_since = now


class Stats:
    """Server-wide counters. Only the event loop thread touches them."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.meters: dict[str, SlotMeter] = {}
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.responses_by_status: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.generations_started = 0
        self.generations_completed = 0
        self.tokens_generated = 0
        self.loads = 0
        self.unloads = 0
        self.evictions = 0
        self.rejected_503 = 0
        self.client_disconnects = 0
        self.in_flight = 0
        for meter in self.meters.values():
            meter.reset()

    def meter(self, model: str) -> SlotMeter:
        if model not in self.meters:
            self.meters[model] = SlotMeter()
        return self.meters[model]

    def snapshot(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.monotonic() - self.started, 6),
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "responses_by_status": dict(self.responses_by_status),
            "generations_started": self.generations_started,
            "generations_completed": self.generations_completed,
            "tokens_generated": self.tokens_generated,
            "loads": self.loads,
            "unloads": self.unloads,
            "evictions": self.evictions,
            "rejected_503": self.rejected_503,
            "client_disconnects": self.client_disconnects,
            "faults_injected": dict(self.faults_injected),
            "in_flight": self.in_flight,
        }


class EventLog:
    """A bounded ring buffer of events with long-polling readers."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._seq = 0
        self._changed = asyncio.Event()

    @property
    def last_seq(self) -> int:
        return self._seq

    def emit(self, kind: str, **fields: Any) -> None:
        self._seq += 1
        event = {"seq": self._seq, "t": time.time(), "type": kind}
        event.update((k, v) for k, v in fields.items() if v is not None)
        self._events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def clear(self) -> None:
        """Forget all events; sequence numbers keep growing so readers never go backwards."""
        self._events.clear()

    def since(self, seq: int) -> list[dict[str, Any]]:
        if not self._events or self._events[-1]["seq"] <= seq:
            return []
        return [e for e in self._events if e["seq"] > seq]

    async def wait_since(self, seq: int, timeout_s: float) -> list[dict[str, Any]]:
        """Return events newer than ``seq``, waiting up to ``timeout_s`` for the first one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            events = self.since(seq)
            remaining = deadline - loop.time()
            if events or remaining <= 0:
                return events
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self.since(seq)
