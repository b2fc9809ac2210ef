"""The four Celery tasks and what wraps every run: stream events, redelivery, typed failures."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery, Task, bootsteps
from celery.exceptions import Reject

from tasks.errors import (
    BrokerUnavailable,
    CorralError,
    InvalidRequest,
    TaskCancelled,
    TaskTimeout,
    error_from_dict,
)
from tasks.execution import RUNNERS, Execution
from tasks.keys import TASK_NAMES, cancel_key, log_key, stream_channel
from tasks.lifecycle import Lease, add_dead_letter
from tasks.payloads import validate_payload
from tasks.publisher import StreamPublisher
from tasks.results import Timings
from tasks.settings import Settings
from tasks.tls import tls_config
from workers.ollama_client import (
    OllamaClient,
    OllamaConfig,
    RetryPolicy,
    StreamAbort,
    Timeouts,
)

log = logging.getLogger("corral.worker")


@dataclass
class WorkerRuntime:
    """Per-process resources: built once in each worker process (after any fork)."""

    pid: int
    settings: Settings
    redis: redis.Redis
    ollama: OllamaClient

    @classmethod
    def build(cls, settings: Settings, pool_size: int) -> WorkerRuntime:
        config = OllamaConfig(
            host=settings.ollama_host,
            timeouts=Timeouts(
                connect_s=settings.connect_timeout_s,
                first_byte_s=settings.first_byte_timeout_s,
                stall_s=settings.stall_timeout_s,
            ),
            retry=RetryPolicy(
                transport_retries=settings.http_retries,
                backoff_s=settings.retry_backoff_s,
                backoff_max_s=settings.retry_backoff_max_s,
            ),
            tls=tls_config(settings),
            pool_size=pool_size,
        )
        client = redis.Redis.from_url(
            settings.redis_url, health_check_interval=10, socket_keepalive=True
        )
        return cls(os.getpid(), settings, client, OllamaClient(config))


def runtime_for(app: Celery) -> WorkerRuntime:
    current = getattr(app, "_corral_runtime", None)
    if current is None or current.pid != os.getpid():
        pool_size = int(app.conf.worker_concurrency or 1)
        current = WorkerRuntime.build(app.corral_settings, pool_size)  # type: ignore[attr-defined]
        app._corral_runtime = current  # type: ignore[attr-defined]
    return current


def execute(
    task: Task,
    kind: str,
    payload: Any,
    submitted_at: Any,
    deadline_s: Any,
    extra: dict[str, Any],
) -> Any:
    """Run one delivery of a task; exactly one terminal event ends its stream."""
    rt = runtime_for(task.app)
    task_id = str(task.request.id)
    settings = rt.settings
    publisher = StreamPublisher(
        rt.redis,
        task_id=task_id,
        channel=stream_channel(task_id),
        log_key=log_key(task_id),
        maxlen=settings.stream_maxlen,
        ttl_s=settings.stream_ttl_s,
        cancel_key=cancel_key(task_id),
    )
    started = time.time()
    enqueued = float(submitted_at) if isinstance(submitted_at, int | float) else started
    valid_deadline = isinstance(deadline_s, int | float) and deadline_s > 0
    deadline = enqueued + (float(deadline_s) if valid_deadline else settings.task_deadline_s)

    abort = StreamAbort()

    def on_cancel() -> None:
        publisher.cancel_requested = True
        abort.fire()

    publisher.on_cancel = abort.fire  # seen on a stream write: stop at once, mid-chunk
    worker = str(task.request.hostname or socket.gethostname())
    lease = Lease(
        rt.redis,
        task_id,
        settings.lease_ttl_s,
        _delivery_tag(task),
        on_cancel,
        consuming=lambda: worker_consuming(task.app),
    )
    try:
        finished = _open_and_lease(publisher, lease, worker, started, deadline, settings)
    except redis.RedisError as exc:
        log.warning("task %s lost Redis before it started (%s); it will be delivered again",
                    task_id, exc)  # fmt: skip
        raise Reject(f"lost Redis before the task started: {exc}", requeue=True) from exc
    if finished is not None:
        return _replay_outcome(finished)
    lease.start_heartbeat()
    final_state = "failed"
    try:
        timings = Timings(enqueued_at=enqueued, started_at=started)
        result = _run(task, rt, kind, payload, extra, publisher, timings, deadline, abort, worker)
        final_state = "succeeded"
        return result
    except TaskCancelled:
        final_state = "cancelled"
        raise
    except Reject:
        final_state = "running"  # it will be delivered again
        raise
    finally:
        lease.release(final_state)


def _open_and_lease(publisher: StreamPublisher, lease: Lease, worker: str, started: float,
                    deadline: float, settings: Settings) -> dict[str, Any] | None:  # fmt: skip
    """Open the stream and take the lease. Returns the recorded terminal event if the task
    already ended (a redelivery after the run finished), else None: this worker runs it."""
    publisher.open()
    if publisher.finished_event is not None:
        return publisher.finished_event
    begun = lease.begin(worker, started, settings.result_ttl_s)
    if begun == "leased":
        # Delivered again while a live worker still runs it: wait for that run to end.
        log.warning("task %s is leased by another worker; waiting for it", publisher.task_id)
        lease.wait_for_other(deadline)
        publisher.open()
        if publisher.finished_event is not None:
            return publisher.finished_event
        begun = lease.begin(worker, started, settings.result_ttl_s)
        if begun == "leased":
            raise TaskTimeout("another worker held the task past its deadline",
                              task_id=publisher.task_id)  # fmt: skip
    if begun == "cancelled":
        # A producer cancelled it while queued and already wrote the terminal event.
        raise TaskCancelled("cancelled before it started", task_id=publisher.task_id)
    return None


def _run(task: Task, rt: WorkerRuntime, kind: str, payload: Any, extra: dict[str, Any],
         publisher: StreamPublisher, timings: Timings, deadline: float,
         abort: StreamAbort, worker: str) -> Any:  # fmt: skip
    task_id = publisher.task_id
    settings = rt.settings
    try:
        if extra:
            raise InvalidRequest(f"unexpected task arguments: {', '.join(sorted(extra))}")
        parsed = validate_payload(kind, payload, settings)
        if publisher.text_since_start:
            publisher.emit("restart", attempt=1, reason="delivered again after a worker was lost")
        publisher.emit(
            "start",
            kind=kind,
            model=parsed.model,
            worker=worker,
            ollama_host=rt.ollama.base_url,
            at=time.time(),
        )
        if publisher.cancel_requested:
            raise TaskCancelled("cancelled before it started", task_id=task_id)
        if time.time() > deadline:
            raise TaskTimeout(
                f"the task waited in the queue past its deadline "
                f"({deadline - (timings.enqueued_at or 0):g} s)",
                task_id=task_id,
            )
        run = Execution(
            task_id=task_id, settings=settings, ollama=rt.ollama, redis=rt.redis,
            publisher=publisher, timings=timings, deadline=deadline, abort=abort,
        )  # fmt: skip
        result = RUNNERS[kind](run, parsed)
        timings.finished_at = time.time()
        result.update(
            timings=timings.model_dump(exclude_none=True),
            worker=worker,
            ollama_host=rt.ollama.base_url,
        )
        publisher.finish("done", result=result)
        return result
    except TaskCancelled as exc:
        exc.with_info(task_id=task_id)
        publisher.finish("cancelled", reason=exc.message)
        raise
    except CorralError as exc:
        exc.with_info(task_id=task_id)
        log.info("task %s failed: %s: %s", task_id, type(exc).__name__, exc.message)
        if exc.retryable:
            add_dead_letter(rt.redis, task_id, {"kind": kind, "payload": payload,
                                                "error": exc.to_dict()})  # fmt: skip
        publisher.finish("error", error=exc.to_dict())
        raise
    except redis.RedisError as exc:
        # Lost Redis mid-run: close the stream with a retryable error if possible, and leave
        # the message unacknowledged so that it is delivered again and its result stored.
        log.warning("task %s lost Redis (%s); it will be delivered again", task_id, exc)
        lost = BrokerUnavailable(f"lost Redis while running: {exc}", task_id=task_id)
        with contextlib.suppress(Exception):
            publisher.emergency_finish("error", error=lost.to_dict())
        raise Reject(lost.message, requeue=True) from exc
    except Exception as exc:
        log.exception("task %s hit an internal error", task_id)
        wrapped = CorralError(f"internal error in the worker: {exc!r}", task_id=task_id)
        publisher.finish("error", error=wrapped.to_dict())
        raise wrapped from exc


def worker_consuming(app: Celery) -> bool:
    """False once this worker's consumer has stopped (shutdown, or wedged after a broker loss).

    Known only in the process that runs the consumer (the threads pool); elsewhere, True.
    """
    consumer = getattr(app, "_corral_consumer", None)
    if consumer is None:
        return True
    return bool(consumer.blueprint is not None and consumer.blueprint.state == bootsteps.RUN)


def _delivery_tag(task: Task) -> str | None:
    for source in (task.request.delivery_info, task.request.properties):
        if isinstance(source, dict) and source.get("delivery_tag"):
            return str(source["delivery_tag"])
    return None


def _replay_outcome(event: dict[str, Any]) -> Any:
    """A redelivered task that had already finished: report the recorded outcome again."""
    if event["type"] == "done":
        return event["result"]
    if event["type"] == "cancelled":
        raise TaskCancelled(event.get("reason", "cancelled"), task_id=event["task_id"])
    raise error_from_dict(event.get("error", {}))


def register_tasks(app: Celery) -> dict[str, Task]:
    """Define the four tasks on ``app`` (workers need them; producers only send by name)."""
    registered = {}
    for kind, name in TASK_NAMES.items():
        registered[kind] = app.task(name=name, bind=True)(_make_task_function(kind))
    return registered


def _make_task_function(kind: str) -> Any:
    def run(
        self: Task,
        payload: Any = None,
        submitted_at: Any = None,
        deadline_s: Any = None,
        **extra: Any,
    ) -> Any:
        return execute(self, kind, payload, submitted_at, deadline_s, extra)

    run.__name__ = kind
    run.__doc__ = f"Run a {kind} task against Ollama, streaming its events."
    return run
