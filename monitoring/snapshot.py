"""Everything the exporter reads from Redis on a scrape, in one pipelined round trip, cached.

Two speeds keep a scrape cheap however large the keyspace grows:

- **discovery** (every ``discover_every_s``): which model queues and workers exist. It SCANs
  the keyspace (kombu's queue bindings, worker announcements), so it runs rarely.
- **read** (at most once per ``max_age_s``): one pipeline of O(1) commands: LLEN and LINDEX -1
  of every priority sub-list, HLEN of kombu's unacked hash and of the dead-letter hash, the
  count of messages the ledger sweep recovered, SMEMBERS
  of the (small) set of models, MGET of the known worker announcements. Scrapes in between get
  the cached answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import redis

from monitoring.messages import parse_message
from tasks.keys import (
    DLQ_KEY,
    KOMBU_UNACKED,
    LEDGER_STATS_KEY,
    MODELS_KEY,
    PRIORITY_STEPS,
    model_of_queue,
    queue_name,
    worker_key,
)
from tasks.queues import known_queues, sublists
from tasks.registry import WorkerInfo, live_workers


@dataclass(frozen=True)
class QueueState:
    model: str
    queue: str
    waiting: int
    oldest_age_s: float  # 0 when the queue is empty


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    queues: list[QueueState]
    unacked: int  # reserved or running: delivered to a worker, not yet acknowledged
    dead_letters: int
    workers: list[WorkerInfo]
    read_s: float  # wall time of the Redis round trip
    commands: int  # Redis commands in that round trip
    ok: bool = True
    error: str = ""
    recovered: int = 0  # messages lost between pop and record that the ledger sweep requeued

    def hosts(self) -> list[str]:
        return sorted({w.ollama_host for w in self.workers})


@dataclass
class _Known:
    queues: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    at: float = float("-inf")


class RedisSnapshot:
    """Thread-safe, cached reads of queue depths, message ages, unacked count and workers."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_age_s: float = 1.0,
        discover_every_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self.max_age_s = max_age_s
        self.discover_every_s = discover_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._known = _Known()
        self._cached: Snapshot | None = None
        # task id → when first seen waiting, for messages without submitted_at
        self._first_seen: dict[str, float] = {}
        self.reads = 0  # round trips made, for the exporter's self-metrics and tests

    def get(self) -> Snapshot:
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached.taken_at < self.max_age_s:
                return self._cached
            try:
                if now - self._known.at >= self.discover_every_s:
                    self._discover(now)
                self._cached = self._read(now)
            except redis.RedisError as exc:
                # Keep serving the last figures, flagged, rather than failing the whole scrape.
                base = self._cached or Snapshot(now, [], 0, 0, [], 0.0, 0)
                self._cached = replace(
                    base, taken_at=now, read_s=0.0, commands=0, ok=False, error=str(exc)
                )
            return self._cached

    def _discover(self, now: float) -> None:
        workers = live_workers(self._redis)
        queues = set(known_queues(self._redis))
        for worker in workers:
            queues.update(worker.queues)
        self._known = _Known(sorted(queues), [w.node for w in workers], now)

    def _read(self, now: float) -> Snapshot:
        queues, nodes = self._known.queues, self._known.nodes
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            for name in sublists(queue):
                pipe.llen(name)
                pipe.lindex(name, -1)  # kombu LPUSHes and BRPOPs: the tail is the oldest
        pipe.hlen(KOMBU_UNACKED)
        pipe.hlen(DLQ_KEY)
        pipe.hget(LEDGER_STATS_KEY, "requeued")
        pipe.smembers(MODELS_KEY)  # new models join the next read without waiting for a SCAN
        if nodes:
            pipe.mget([worker_key(n) for n in nodes])
        started = time.perf_counter()
        replies = pipe.execute()
        read_s = time.perf_counter() - started
        self.reads += 1
        commands = len(replies)

        states: list[QueueState] = []
        seen: set[str] = set()
        per_queue = 2 * len(PRIORITY_STEPS)
        for index, queue in enumerate(queues):
            chunk = replies[index * per_queue : (index + 1) * per_queue]
            waiting = sum(int(n) for n in chunk[0::2])
            oldest = min(
                (self._submitted(raw, now, seen) for raw in chunk[1::2] if raw), default=now
            )
            states.append(QueueState(model_of_queue(queue), queue, waiting, max(0.0, now - oldest)))
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in seen}
        rest = replies[len(queues) * per_queue :]
        fresh = {queue_name(m.decode()) for m in rest[3]} - set(queues)
        if fresh:
            self._known.queues = sorted(set(queues) | fresh)
        workers = [WorkerInfo(**json.loads(v)) for v in (rest[4] if nodes else []) if v]
        return Snapshot(
            now,
            states,
            int(rest[0]),
            int(rest[1]),
            workers,
            read_s,
            commands,
            recovered=int(rest[2] or 0),
        )

    def _submitted(self, raw: bytes, now: float, seen: set[str]) -> float:
        message = parse_message(raw)
        if message is None:
            return now
        if message.submitted_at is not None:
            return min(message.submitted_at, now)
        if message.task_id is None:
            return now
        seen.add(message.task_id)
        return self._first_seen.setdefault(message.task_id, now)
