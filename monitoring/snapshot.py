"""Everything the exporter reads from Redis on a scrape, in three pipelined round trips, cached.

Two speeds keep a scrape cheap however large the keyspace grows:

- **discovery** (every ``discover_every_s``): which model queues, workers and Ollama hosts
  exist, from their indexes (three reads, whatever the tasks in Redis). The first one enters
  in the indexes what data written before them holds (:func:`tasks.queues.index_existing`:
  the one keyspace SCAN, once per exporter).
- **read** (at most once per ``max_age_s``): one pipeline of O(1) commands: LLEN and LINDEX -1
  of every model queue's list, HLEN of kombu's unacked hash and of the dead-letter hash, the
  count of messages the ledger sweep recovered, SMEMBERS
  of the (small) set of models, MGET of the known worker announcements, HGETALL of each
  host's scheduling state and of the wait histogram; then the scheduler's backlog of every
  model (:meth:`Scheduler.backlogs`: two round trips, O(models + tenants) commands, none per
  task). Scrapes in between get the cached answer.
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
    SCHED_MODELS_KEY,
    SCHED_WAITS_KEY,
    model_of_queue,
    sched_host_key,
    worker_key,
)
from tasks.queues import (
    HostUse,
    index_existing,
    known_queues,
    queues_of,
    scheduled_hosts,
    sublists,
)
from tasks.registry import WorkerInfo, live_workers
from tasks.scheduler import Backlog, Scheduler, backlog_commands
from tasks.scheduler.lua import WAIT_BUCKETS_S
from tasks.settings import Settings, load_settings


@dataclass(frozen=True)
class QueueState:
    model: str
    queue: str
    waiting: int  # in the Celery queue plus held by the scheduler
    oldest_age_s: float  # of the oldest of them; 0 when there is none


@dataclass(frozen=True)
class WaitHistogram:
    """Waits from submission to start of the tasks released in one priority band."""

    counts: list[int]  # per bucket of WAIT_BUCKETS_S, then the one past the last bound
    sum_s: float


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    queues: list[QueueState]
    unacked: int  # reserved or running: delivered to a worker, not yet acknowledged
    dead_letters: int
    workers: list[WorkerInfo]
    read_s: float  # wall time of the Redis round trips
    commands: int  # Redis commands in those round trips
    ok: bool = True
    error: str = ""
    recovered: int = 0  # messages lost between pop and record that the ledger sweep requeued
    backlogs: list[Backlog] = field(default_factory=list)  # the scheduler's, per model
    scheduled_hosts: list[HostUse] = field(default_factory=list)
    waits: dict[int, WaitHistogram] = field(default_factory=dict)  # per priority band

    def hosts(self) -> list[str]:
        return sorted({w.ollama_host for w in self.workers})


@dataclass
class _Known:
    queues: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # Ollama hosts the scheduler may know
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
        settings: Settings | None = None,
    ) -> None:
        self._redis = client
        # Only the scheduler's aging step and task deadline are read: the client is given.
        self._scheduler = Scheduler(client, settings or load_settings())
        self.max_age_s = max_age_s
        self.discover_every_s = discover_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._known = _Known()
        self._indexed = False  # index_existing() ran
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
        if not self._indexed:
            index_existing(self._redis)
            self._indexed = True
        workers = live_workers(self._redis)
        queues = set(known_queues(self._redis))
        for worker in workers:
            queues.update(worker.queues)
        hosts = {w.ollama_host for w in workers} | set(scheduled_hosts(self._redis))
        self._known = _Known(sorted(queues), [w.node for w in workers], sorted(hosts), now)

    def _read(self, now: float) -> Snapshot:
        queues, nodes, hosts = self._known.queues, self._known.nodes, self._known.hosts
        pipe = self._redis.pipeline(transaction=False)
        for queue in queues:
            for name in sublists(queue):
                pipe.llen(name)
                pipe.lindex(name, -1)  # kombu LPUSHes and BRPOPs: the tail is the oldest
        pipe.hlen(KOMBU_UNACKED)
        pipe.hlen(DLQ_KEY)
        pipe.hget(LEDGER_STATS_KEY, "requeued")
        # new models join the next read without waiting for the next discovery
        pipe.sunion([MODELS_KEY, SCHED_MODELS_KEY])
        if nodes:
            pipe.mget([worker_key(n) for n in nodes])
        for host in hosts:
            pipe.hgetall(sched_host_key(host))
        pipe.hgetall(SCHED_WAITS_KEY)
        started = time.perf_counter()
        replies = pipe.execute()
        models = [model_of_queue(q) for q in queues]
        backlogs = self._scheduler.backlogs(models, now=now) if models else []
        read_s = time.perf_counter() - started
        self.reads += 1
        tenants = sum(len(b.by_tenant) for b in backlogs)
        commands = len(replies) + backlog_commands(len(models), tenants)

        states: list[QueueState] = []
        seen: set[str] = set()
        per_queue = 2 * len(PRIORITY_STEPS)
        for index, queue in enumerate(queues):
            chunk = replies[index * per_queue : (index + 1) * per_queue]
            backlog = backlogs[index]
            waiting = sum(int(n) for n in chunk[0::2]) + backlog.pending
            oldest = min(
                (self._submitted(raw, now, seen) for raw in chunk[1::2] if raw), default=now
            )
            age = max(0.0, now - oldest, backlog.oldest_wait_s)
            states.append(QueueState(model_of_queue(queue), queue, waiting, age))
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in seen}
        rest = replies[len(queues) * per_queue :]
        fresh = queues_of(rest[3]) - set(queues)
        if fresh:
            self._known.queues = sorted(set(queues) | fresh)
        workers = [WorkerInfo(**json.loads(v)) for v in (rest[4] if nodes else []) if v]
        host_states = rest[5 if nodes else 4 : -1]
        return Snapshot(
            now,
            states,
            int(rest[0]),
            int(rest[1]),
            workers,
            read_s,
            commands,
            recovered=int(rest[2] or 0),
            backlogs=backlogs,
            scheduled_hosts=[_host_use(h, raw) for h, raw in zip(hosts, host_states, strict=True)],
            waits=wait_histograms(rest[-1]),
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


def _host_use(host: str, raw: dict[bytes, bytes]) -> HostUse:
    model, since = raw.get(b"model"), raw.get(b"since")
    return HostUse(
        host,
        model.decode() if model else None,
        float(since) if since else None,
        int(raw.get(b"switches", 0)),
    )


def wait_histograms(raw: dict[bytes, bytes]) -> dict[int, WaitHistogram]:
    """The scheduler's wait counts (``SCHED_WAITS_KEY``: ``band:bucket`` and ``band:sum``)."""
    counts: dict[int, list[int]] = {}
    sums: dict[int, float] = {}
    for name, value in raw.items():
        band_text, _, bucket = name.decode().partition(":")
        band = int(band_text)
        row = counts.setdefault(band, [0] * (len(WAIT_BUCKETS_S) + 1))
        if bucket == "sum":
            sums[band] = float(value)
        elif bucket == "inf":
            row[-1] += int(value)
        else:
            row[int(bucket)] += int(value)
    return {b: WaitHistogram(counts[b], sums.get(b, 0.0)) for b in sorted(counts)}
