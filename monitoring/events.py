"""Feed the counters and histograms from Celery task events and the results they announce.

A ``task-succeeded`` event carries only a repr of the result, so the outcome is read from the
result backend instead, where ``result_extended`` also keeps the task's name and queue: that is
the one place every terminal outcome is recorded in full, whoever submitted the task. The reads
are batched (one pipelined MGET per burst of events) on a thread of their own, so a slow Redis
never stalls the event stream.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import redis
from celery import Celery

from monitoring.metrics import TaskMetrics
from tasks.errors import ERROR_TYPES, CorralError
from tasks.keys import model_of_queue
from tasks.kinds import registry

log = logging.getLogger("corral.exporter")

TERMINAL = {"task-succeeded": "succeeded", "task-failed": "failed", "task-revoked": "revoked"}
STEPS = {
    "task-sent": "sent",
    "task-received": "received",
    "task-started": "started",
    "task-retried": "retried",
}
_MODEL_IN_REPR = re.compile(r"""['"]model['"]:\s*['"]([^'"]{1,200})['"]""")
UNKNOWN = "unknown"


class TaskLabels:
    """Remembers (kind, model) per task id from early events, for events that lack them."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._items: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def note(self, task_id: str, kind: str, model: str) -> None:
        with self._lock:
            old = self._items.get(task_id, (UNKNOWN, UNKNOWN))
            self._items[task_id] = (
                kind if kind != UNKNOWN else old[0],
                model if model != UNKNOWN else old[1],
            )
            self._items.move_to_end(task_id)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def get(self, task_id: str) -> tuple[str, str]:
        with self._lock:
            return self._items.get(task_id, (UNKNOWN, UNKNOWN))

    def forget(self, task_id: str) -> None:
        with self._lock:
            self._items.pop(task_id, None)


def kind_of_task(task_name: Any, default: str) -> str:
    """The kind a Celery task name runs (``corral.chat`` → ``chat``), else ``default``."""
    kind = registry.by_task_name(str(task_name))
    return kind.name if kind is not None else default


def labels_from_event(event: dict[str, Any]) -> tuple[str, str]:
    """(kind, model) from what a task-sent or task-received event carries."""
    kind = kind_of_task(event.get("name"), UNKNOWN)
    queue_name = event.get("queue") or event.get("routing_key")
    if isinstance(queue_name, str) and queue_name.startswith("corral."):
        return kind, model_of_queue(queue_name)
    match = _MODEL_IN_REPR.search(str(event.get("kwargs") or ""))
    return kind, match.group(1) if match else UNKNOWN


def labels_from_meta(meta: dict[str, Any], fallback: tuple[str, str]) -> tuple[str, str]:
    """(kind, model) from a result-backend record (``result_extended`` keeps name and queue)."""
    raw_result = meta.get("result")
    result: dict[str, Any] = raw_result if isinstance(raw_result, dict) else {}
    kind = result.get("kind") or kind_of_task(meta.get("name"), fallback[0])
    model = result.get("model")
    if not model and isinstance(meta.get("queue"), str) and meta["queue"].startswith("corral."):
        model = model_of_queue(meta["queue"])
    if not model and isinstance(meta.get("kwargs"), dict):
        payload = meta["kwargs"].get("payload")
        model = payload.get("model") if isinstance(payload, dict) else None
    return str(kind or UNKNOWN), str(model or fallback[1])


class Outcomes:
    """Turns one terminal backend record into metric updates."""

    def __init__(self, metrics: TaskMetrics) -> None:
        self.m = metrics

    def succeeded(self, kind: str, model: str, result: dict[str, Any]) -> None:
        timings = result.get("timings") or {}
        enqueued = _num(timings.get("enqueued_at"))
        if enqueued is not None:
            for hist, key in (
                (self.m.queue_wait, "started_at"),
                (self.m.first_token, "first_token_at"),
                (self.m.duration, "finished_at"),
            ):
                moment = _num(timings.get(key))
                if moment is not None:
                    hist.labels(kind, model).observe(max(0.0, moment - enqueued))
        metrics = result.get("metrics") or {}
        eval_count, eval_ns = _num(metrics.get("eval_count")), _num(metrics.get("eval_duration"))
        if eval_count:
            self.m.tokens.labels(model).inc(eval_count)
        if prompt := _num(metrics.get("prompt_eval_count")):
            self.m.prompt_tokens.labels(model).inc(prompt)
        if eval_count and eval_ns:
            self.m.generation_seconds.labels(model).inc(eval_ns / 1e9)
            self.m.tokens_per_second.labels(model).observe(eval_count / (eval_ns / 1e9))
        self._retries(kind, model, result.get("attempts"))

    def failed(self, kind: str, model: str, result: Any) -> None:
        error, info = _error_of(result)
        cls = ERROR_TYPES.get(error)
        if error == "TaskCancelled":
            self.m.cancellations.labels(kind, model).inc()
            return
        retryable = bool(cls.retryable) if cls else bool(info.get("retryable", False))
        self.m.errors.labels(kind, model, error, str(retryable).lower()).inc()
        self._retries(kind, model, info.get("attempts"))
        if retryable and cls is not None and issubclass(cls, CorralError):
            self.m.dead_letters.labels(kind, model).inc()  # the worker dead-letters these

    def _retries(self, kind: str, model: str, attempts: Any) -> None:
        n = _num(attempts)
        if n is not None and n > 1:
            self.m.retries.labels(kind, model).inc(n - 1)


def _error_of(result: Any) -> tuple[str, dict[str, Any]]:
    """(class name, info) of a failure record as Celery's JSON backend stores it."""
    if not isinstance(result, dict):
        return "unknown", {}
    name = str(result.get("exc_type") or "unknown")
    message = result.get("exc_message")
    info = message[1] if isinstance(message, list | tuple) and len(message) > 1 else {}
    return name, info if isinstance(info, dict) else {}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class EventFeed:
    """Two daemon threads: one captures task events, one reads terminal outcomes in batches."""

    RETRY_READS = 5  # a terminal event can outrun its backend write by a moment
    RETRY_DELAY_S = 0.2

    def __init__(self, app: Celery, client: redis.Redis, metrics: TaskMetrics) -> None:
        self.app = app
        self.redis = client
        self.metrics = metrics
        self.outcomes = Outcomes(metrics)
        self.labels = TaskLabels()
        self.connected = False
        self._pending: queue.Queue[tuple[str, str, int]] = queue.Queue()
        self._stop = threading.Event()

    def start(self) -> EventFeed:
        threading.Thread(target=self._capture_loop, name="events", daemon=True).start()
        threading.Thread(target=self._read_loop, name="outcomes", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # -- events --------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        kind_of_event = str(event.get("type"))
        self.metrics.events.labels(kind_of_event).inc()
        task_id = str(event.get("uuid") or "")
        if not task_id:
            return
        if kind_of_event in ("task-sent", "task-received"):
            self.labels.note(task_id, *labels_from_event(event))
        if kind_of_event in STEPS:
            self.metrics.tasks.labels(*self.labels.get(task_id), STEPS[kind_of_event]).inc()
        elif kind_of_event in TERMINAL:
            self._pending.put((task_id, kind_of_event, 0))

    def _capture_loop(self) -> None:
        handlers = {name: self.handle for name in (*STEPS, *TERMINAL)}
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as connection:
                    receiver = self.app.events.Receiver(connection, handlers=handlers)
                    self.connected = True
                    backoff = 0.5
                    receiver.capture(limit=None, timeout=None, wakeup=False)
            except Exception as exc:  # noqa: BLE001 - any broker failure: reconnect after a pause
                log.warning("task event stream lost (%s); reconnecting", exc)
            self.connected = False
            self._stop.wait(backoff)
            backoff = min(10.0, backoff * 2)

    # -- outcomes ------------------------------------------------------------------------
    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._pending.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < 500:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self.process(batch)
            except redis.RedisError as exc:
                log.warning("cannot read task outcomes (%s); retrying", exc)
                time.sleep(1.0)
                for item in batch:
                    self._pending.put(item)

    def process(self, batch: list[tuple[str, str, int]]) -> None:
        """Read the backend records of ``batch`` in one MGET and count their outcomes."""
        keys = [self.app.backend.get_key_for_task(task_id) for task_id, _, _ in batch]
        raws = self.redis.mget(keys)
        late = []
        for (task_id, event_type, tries), raw in zip(batch, raws, strict=True):
            meta = _loads(raw)
            state = TERMINAL[event_type]
            written = meta.get("status") in ("SUCCESS", "FAILURE", "REVOKED")
            if not written and state != "revoked" and tries < self.RETRY_READS:
                late.append((task_id, event_type, tries + 1))
                continue
            self._count(task_id, state, meta)
        if late:
            time.sleep(self.RETRY_DELAY_S)
            for item in late:
                self._pending.put(item)

    def _count(self, task_id: str, state: str, meta: dict[str, Any]) -> None:
        kind, model = labels_from_meta(meta, self.labels.get(task_id))
        self.labels.forget(task_id)
        status = meta.get("status")
        if status == "FAILURE" and _error_of(meta.get("result"))[0] == "TaskCancelled":
            state = "cancelled"
        self.metrics.tasks.labels(kind, model, state).inc()
        if state == "revoked":
            self.metrics.cancellations.labels(kind, model).inc()
        elif status == "SUCCESS" and isinstance(meta.get("result"), dict):
            self.outcomes.succeeded(kind, model, meta["result"])
        elif status == "FAILURE":
            self.outcomes.failed(kind, model, meta.get("result"))
        elif state == "failed":
            self.outcomes.failed(kind, model, None)


def _loads(raw: bytes | str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
