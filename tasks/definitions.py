"""The Celery tasks, one per task kind, and what wraps every run: stream events, redelivery,
typed failures."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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
from tasks.execution import Execution, task_clock
from tasks.keys import canonical_model
from tasks.kinds import registry
from tasks.kinds.base import TaskKind
from tasks.lifecycle import Lease, StartNotTaken, add_dead_letter
from tasks.payloads import validate_payload
from tasks.publisher import StreamPublisher
from tasks.result_backend import StreamingRedisBackend
from tasks.results import Timings
from tasks.scheduler import Scheduler
from tasks.scheduler.release import Releaser
from tasks.settings import Settings
from tasks.take_along import TakeAlong
from tasks.tls import tls_config
from workers.batcher import Batcher
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
    batcher: Batcher  # gathers the process's embed tasks into shared calls
    scheduler: Scheduler
    releaser: Releaser
    app: Celery

    @classmethod
    def build(cls, app: Celery, settings: Settings, pool_size: int) -> WorkerRuntime:
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
        batcher = Batcher(settings.embed_batch_max_inputs, name="embed")
        scheduler = Scheduler(client, settings)
        return cls(
            os.getpid(),
            settings,
            client,
            OllamaClient(config),
            batcher,
            scheduler,
            Releaser(scheduler),
            app,
        )


class CorralTask(Task):
    """Base class of the kinds' tasks. It owns what the tasks of a worker process share: the
    settings, and the :class:`WorkerRuntime`, built lazily in each process (after any fork)."""

    settings: ClassVar[Settings | None] = None  # set when the worker's app is configured
    # The result's repr in Celery's task-succeeded event, for Flower (1024 by default): built
    # for every task, and the exporter reads results from the backend, not from the event.
    resultrepr_maxsize = 256
    consumer: ClassVar[Any] = None  # the worker's Consumer once it runs (see consuming())
    _runtime: ClassVar[WorkerRuntime | None] = None

    @property
    def runtime(self) -> WorkerRuntime:
        return CorralTask.runtime_for(self.app)

    @staticmethod
    def runtime_for(app: Celery) -> WorkerRuntime:
        """This process's runtime, built on first use (one for every task of the process)."""
        current = CorralTask._runtime
        if current is None or current.pid != os.getpid():
            pool_size = int(app.conf.worker_concurrency or 1)  # configures the app if need be
            if CorralTask.settings is None:
                raise RuntimeError("CorralTask.settings is unset: run tasks from tasks.worker_app")
            current = WorkerRuntime.build(app, CorralTask.settings, pool_size)
            CorralTask._runtime = current
        return current

    @staticmethod
    def consuming() -> bool:
        """False once this worker's consumer has stopped (shutdown, or wedged after a broker
        loss). Known only in the process that runs the consumer (the threads pool); elsewhere,
        True."""
        consumer = CorralTask.consumer
        if consumer is None:
            return True
        return bool(consumer.blueprint is not None and consumer.blueprint.state == bootsteps.RUN)


@dataclass(frozen=True)
class Delivery:
    """One delivery of a task message: what its run carries from start to end."""

    task_id: str
    kind: TaskKind[Any, Any]
    payload: Any  # as it arrived; the run validates it
    extra: dict[str, Any]  # arguments that no task takes: the run refuses them
    worker: str
    started_at: float  # time.time() when this delivery began
    timings: Timings
    deadline: float  # time.time() after which no new attempt starts
    publisher: StreamPublisher
    abort: StreamAbort  # shuts the Ollama socket down on cancel

    @classmethod
    def receive(
        cls,
        task: CorralTask,
        kind: TaskKind[Any, Any],
        payload: Any,
        submitted_at: Any,
        deadline_s: Any,
        extra: dict[str, Any],
    ) -> Delivery:
        rt = task.runtime
        task_id = str(task.request.id)
        settings = rt.settings
        publisher = StreamPublisher.of_task(rt.redis, task_id, settings)
        started = time.time()
        timings, deadline = task_clock(submitted_at, deadline_s, started, settings)
        abort = StreamAbort()
        publisher.on_cancel = abort.fire  # seen on a stream write: stop at once, mid-chunk
        return cls(
            task_id=task_id,
            kind=kind,
            payload=payload,
            extra=extra,
            worker=str(task.request.hostname or socket.gethostname()),
            started_at=started,
            timings=timings,
            deadline=deadline,
            publisher=publisher,
            abort=abort,
        )

    def cancel(self) -> None:
        """A cancel was requested (seen by the lease heartbeat): stop between chunks, and now."""
        self.publisher.cancel_requested = True
        self.abort.fire()


def execute(
    task: CorralTask,
    kind: TaskKind[Any, Any],
    payload: Any,
    submitted_at: Any,
    deadline_s: Any,
    extra: dict[str, Any],
) -> Any:
    """Run one delivery of a task; exactly one terminal event ends its stream.

    A first delivery of a kind that streams does not wait for its start step: the step goes
    out, then the request to Ollama, and the step's answer is read while Ollama works on the
    first token (:meth:`StreamPublisher.opening_sent`). If the step did not start the task (it
    had been delivered before, or was cancelled while queued), the request is dropped and the
    delivery starts again in order."""

    def receive() -> Delivery:
        return Delivery.receive(task, kind, payload, submitted_at, deadline_s, extra)

    try:
        return _execute(task, receive(), ahead=True)
    except StartNotTaken as lost:
        if lost.cause is not None:
            raise _lost_redis_before_start(str(task.request.id), lost.cause) from lost.cause
        log.info("task %s was not started (%s); starting it again in order", task.request.id, lost)
        return _execute(task, receive(), ahead=False)


def _execute(task: CorralTask, delivery: Delivery, *, ahead: bool) -> Any:
    rt = task.runtime
    task_id = delivery.task_id
    lease = Lease(
        rt.redis,
        task_id,
        rt.settings.lease_ttl_s,
        _delivery_tag(task),
        delivery.cancel,
        consuming=CorralTask.consuming,
    )
    try:
        parsed = _validated(rt, delivery)
    except Exception:  # the run raises it again, as the stream's error event
        parsed = None
    # Kinds whose tasks share calls take pending tasks along under this start: not ahead.
    ahead = ahead and parsed is not None and delivery.kind.units is None
    try:
        finished = _open_and_lease(delivery, lease, rt, parsed, ahead=ahead)
    except redis.RedisError as exc:
        raise _lost_redis_before_start(task_id, exc) from exc
    except TaskCancelled:
        _scheduled_end(rt, delivery)  # cancelled while queued: its place frees
        raise
    if finished is not None:
        _scheduled_end(rt, delivery)
        return _replay_outcome(finished)
    lease.start_heartbeat()
    final_state = "failed"
    store: list[Callable[[Any], Any]] = []  # a success, stored with the lease's end
    try:
        result = _run(rt, delivery, parsed)
        final_state = "succeeded"
        store = _success(task, task_id, result)
        return result
    except TaskCancelled:
        final_state = "cancelled"
        raise
    except StartNotTaken:
        final_state = ""  # the lease is not this delivery's: nothing to record or release
        raise
    except Reject:
        final_state = "running"  # it will be delivered again
        raise
    finally:
        # A task that will be delivered again keeps its place; any other frees it, and its
        # host releases into the free slot, in the lease's last step. A success is stored in
        # the same round trip (Celery's own store after the task then does nothing).
        if final_state:
            finish = () if final_state == "running" else _finish(rt, delivery)
            lease.release(final_state, finish, then=store)
        else:
            lease.stop_heartbeat()


def _lost_redis_before_start(task_id: str, exc: redis.RedisError) -> Reject:
    """What a delivery raises when Redis fails before its task started: deliver it again."""
    log.warning(
        "task %s lost Redis before it started (%s); it will be delivered again", task_id, exc
    )
    return Reject(f"lost Redis before the task started: {exc}", requeue=True)


def _success(task: CorralTask, task_id: str, result: Any) -> list[Callable[[Any], Any]]:
    """The task's success as commands for the lease's last step, or none: Celery stores it
    then, as usual (also when it cannot be encoded: Celery reports that its own way)."""
    backend = task.backend
    if not isinstance(backend, StreamingRedisBackend):
        return []
    try:
        return [backend.success_in(task_id, result, task.request)]
    except Exception:
        return []


def _finish(rt: WorkerRuntime, delivery: Delivery) -> list[str | int | float]:
    """The scheduler's end of a task that holds no slot any more (see Lease.release)."""
    payload = delivery.payload
    model = ""
    if isinstance(payload, dict):
        with contextlib.suppress(InvalidRequest):
            model = canonical_model(str(payload.get("model", "")))
    try:
        return rt.releaser.finish_args(delivery.task_id, model, rt.ollama.base_url)
    except redis.RedisError:  # no plan of the live workers: the release timer catches up
        return rt.scheduler.finish_args(delivery.task_id, model, None)


def _scheduled_end(rt: WorkerRuntime, delivery: Delivery) -> None:
    """A task that ends without its lease: its place frees, and its host releases into it."""
    with contextlib.suppress(redis.RedisError):  # the release timer catches up
        rt.scheduler.finish_and_release(_finish(rt, delivery))


def _open_and_lease(
    delivery: Delivery, lease: Lease, rt: WorkerRuntime, parsed: Any, *, ahead: bool = False
) -> dict[str, Any] | None:
    """Open the stream and take the lease (and tell the scheduler the task started, in the
    same step). Returns the recorded terminal event if the task already ended (a redelivery
    after the run finished), else None: this worker runs it.

    A first delivery with a valid payload (``parsed``) does it all in one step that also writes
    its ``start`` event (with ``ahead``, sent without waiting for its answer); a redelivery
    reads the log first, to continue it."""
    publisher, worker, started = delivery.publisher, delivery.worker, delivery.started_at
    settings, host = rt.settings, rt.ollama.base_url
    if parsed is not None:
        first = publisher.first_event("start", **_start_data(rt, delivery, parsed))
        if ahead:
            publisher.opening_sent(
                lease.send_begin_first(
                    worker, started, settings.result_ttl_s, host=host, first=first
                )
            )
            return None
        opening = lease.begin_first(worker, started, settings.result_ttl_s, host=host, first=first)
        if opening.state == "ok":
            publisher.opened(opening)
            return None
        if opening.state == "cancelled":
            raise TaskCancelled("cancelled before it started", task_id=publisher.task_id)
    publisher.open()
    if publisher.finished_event is not None:
        return publisher.finished_event
    begun = lease.begin(worker, started, settings.result_ttl_s, host=host)
    if begun == "leased":
        # Delivered again while a live worker still runs it: wait for that run to end.
        log.warning("task %s is leased by another worker; waiting for it", publisher.task_id)
        lease.wait_for_other(delivery.deadline)
        publisher.open()
        if publisher.finished_event is not None:
            return publisher.finished_event
        begun = lease.begin(worker, started, settings.result_ttl_s, host=host)
        if begun == "leased":
            raise TaskTimeout(
                "another worker held the task past its deadline", task_id=publisher.task_id
            )
    if begun == "cancelled":
        # A producer cancelled it while queued and already wrote the terminal event.
        raise TaskCancelled("cancelled before it started", task_id=publisher.task_id)
    return None


def _validated(rt: WorkerRuntime, delivery: Delivery) -> Any:
    """The task's payload, validated; raises :class:`InvalidRequest`."""
    if delivery.extra:
        raise InvalidRequest(f"unexpected task arguments: {', '.join(sorted(delivery.extra))}")
    return validate_payload(delivery.kind.name, delivery.payload, rt.settings)


def _start_data(rt: WorkerRuntime, delivery: Delivery, parsed: Any) -> dict[str, Any]:
    """The data of a run's ``start`` event."""
    return {
        "kind": delivery.kind.name,
        "model": parsed.model,
        "worker": delivery.worker,
        "ollama_host": rt.ollama.base_url,
        "at": time.time(),
    }


def _run(rt: WorkerRuntime, delivery: Delivery, parsed: Any) -> dict[str, Any]:
    """Run a delivery whose lease is taken; ``parsed`` is its validated payload, or None if it
    failed validation (raised again here, to end the stream with it)."""
    task_id, kind, publisher = delivery.task_id, delivery.kind, delivery.publisher
    timings, deadline = delivery.timings, delivery.deadline
    settings = rt.settings
    try:
        if parsed is None:
            parsed = _validated(rt, delivery)
        if not publisher.first_written:
            if publisher.text_since_start:
                publisher.emit(
                    "restart", attempt=1, reason="delivered again after a worker was lost"
                )
            publisher.emit("start", **_start_data(rt, delivery, parsed))
        if publisher.cancel_requested:
            raise TaskCancelled("cancelled before it started", task_id=task_id)
        if time.time() > deadline:
            raise TaskTimeout(
                f"the task waited in the queue past its deadline "
                f"({deadline - (timings.enqueued_at or 0):g} s)",
                task_id=task_id,
            )
        run = Execution(
            task_id=task_id,
            settings=settings,
            ollama=rt.ollama,
            redis=rt.redis,
            publisher=publisher,
            timings=timings,
            deadline=deadline,
            abort=delivery.abort,
            batcher=rt.batcher,
            take_along=_take_along(rt, delivery),
        )
        result = kind.run(run, parsed)
        timings.finished_at = time.time()
        result.timings = timings
        result.worker = delivery.worker
        result.ollama_host = rt.ollama.base_url
        data: dict[str, Any] = result.model_dump(mode="json", exclude_none=True)
        publisher.finish("done", result=data)
        return data
    except StartNotTaken:
        raise  # nothing of this run may be written
    except TaskCancelled as exc:
        exc.with_info(task_id=task_id)
        publisher.finish("cancelled", reason=exc.message)
        raise
    except CorralError as exc:
        exc.with_info(task_id=task_id)
        publisher.settle()  # before a dead letter: only a started task has one
        log.info("task %s failed: %s: %s", task_id, type(exc).__name__, exc.message)
        if exc.retryable:
            add_dead_letter(
                rt.redis,
                task_id,
                {"kind": kind.name, "payload": delivery.payload, "error": exc.to_dict()},
            )
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


def _take_along(rt: WorkerRuntime, delivery: Delivery) -> TakeAlong | None:
    """For a kind whose tasks share calls: what takes pending ones along into this run's."""
    if delivery.kind.units is None:
        return None
    return TakeAlong(
        app=rt.app,
        client=rt.redis,
        settings=rt.settings,
        scheduler=rt.scheduler,
        worker=delivery.worker,
        host=rt.ollama.base_url,
        consuming=CorralTask.consuming,
    )


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
    """Define one task per registered kind on ``app`` (workers need them; producers only send
    by name)."""
    registered = {}
    for kind in registry:
        # throws: a typed failure is an expected outcome, logged as one line, not a traceback
        define = app.task(
            name=kind.task_name, bind=True, base=CorralTask, shared=False, throws=(CorralError,)
        )
        registered[kind.name] = define(_make_task_function(kind))
    return registered


def _make_task_function(kind: TaskKind[Any, Any]) -> Any:
    def run(
        self: CorralTask,
        payload: Any = None,
        submitted_at: Any = None,
        deadline_s: Any = None,
        **extra: Any,
    ) -> Any:
        return execute(self, kind, payload, submitted_at, deadline_s, extra)

    run.__name__ = kind.name
    run.__doc__ = f"Run a {kind.name} task against Ollama, streaming its events. {kind.summary}"
    return run
