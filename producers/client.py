"""The Python SDK: validate, record, admit to the model's pending work, hand back a :class:`Job`."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import redis
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from producers.batches import Batch, submit_batch
from producers.conversation import Conversation
from producers.events import PubSubPool
from producers.images import ImageInput, large_images, prepare_images, store_large_images
from producers.jobs import Job, results
from tasks.app import create_app
from tasks.errors import BrokerUnavailable, CorralError, InvalidRequest
from tasks.keys import idempotency_key as idempotency_key_name
from tasks.keys import queue_name
from tasks.kinds import KindMethods, registry
from tasks.kinds.base import MessageLike
from tasks.payloads import dump_payload, validate_payload
from tasks.redis_url import masked
from tasks.results import TaskResult
from tasks.scheduler import (
    DEFAULT_PRIORITY,
    DEFAULT_TENANT,
    UNITS_HEADER,
    Admission,
    AdmitStep,
    MessageBuilder,
    Scheduler,
    check_priority,
    check_tenant,
)
from tasks.scheduler.release import Releaser
from tasks.scheduler.served import check_served, served_since, unserved
from tasks.settings import Settings, load_settings
from tasks.webhooks import check_callback_url
from tasks.webhooks.outbox import CALLBACK_FIELD

SUBMIT_CHUNK = 256  # tasks admitted per round trip by Client.submit_many
T = TypeVar("T")

# Delete an idempotency key only while it still names our task (KEYS[1]; ARGV[1]: task id).
_DELETE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Order:
    """Where a task goes in its model's order: its priority and its tenant."""

    priority: int
    tenant: str


class Client(KindMethods):
    """Submit tasks: one method per task kind (``generate``, ``chat``, ``structured``,
    ``multimodal``...; see ``tasks/kinds/``). Needs only ``CORRAL_REDIS_URL``.

    Every kind's method takes its own payload fields, then the keywords of
    :class:`~tasks.kinds.base.SubmitOptions`, which :meth:`submit` describes."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings(redis_url=redis_url)
        self.app = create_app(self.settings, main="corral-producer")
        # One result-backend client for every thread (Celery makes one per thread otherwise),
        # so that close() can close its connections.
        self.backend = self.app.backend
        self.redis = redis.Redis.from_url(self.settings.redis_url, health_check_interval=10)
        self.pubsubs = PubSubPool(self.redis)
        self.reconnect_budget_s = 15.0  # how long a submission waits for Redis to come back
        self.scheduler = Scheduler(self.redis, self.settings)
        self.releaser = Releaser(self.scheduler)
        self._builder: MessageBuilder | None = None
        self._builder_lock = threading.Lock()
        self._forget_key = self.redis.register_script(_DELETE_IF_OURS)

    def close(self) -> None:
        with self._builder_lock:
            if self._builder is not None:
                self._builder.close()
        self.pubsubs.close()
        self.redis.close()
        self.backend.client.connection_pool.disconnect()
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------
    def submit(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        schema_model: type[BaseModel] | None = None,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
        task_id: str | None = None,
        priority: int = DEFAULT_PRIORITY,
        tenant: str | None = None,
        callback_url: str | None = None,
    ) -> Job:
        """Validate ``data`` as a ``kind`` payload and admit it to its model's pending work.

        ``deadline_s`` (default ``CORRAL_TASK_DEADLINE_S``) covers queue wait plus run time.
        With ``idempotency_key``, a second submission within ``CORRAL_IDEMPOTENCY_TTL_S`` returns
        the first task's handle and enqueues nothing. ``task_id`` (default: a new UUID) is for
        callers that must name the task before it exists, e.g. to count it against a limit.
        ``priority`` (0-9, higher runs sooner) and ``tenant`` (whose fair share of the model it
        uses; default ``default``) decide when it starts (docs/scheduling.md). Raises
        :class:`ModelNotFound` for a model nobody serves and :class:`QueueFull` at the
        model's depth bound; nothing is stored then.
        With ``callback_url``, the task's end is POSTed there, signed (README, "Webhooks").
        """
        clean = {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data
        payload = validate_payload(kind, clean, self.settings)
        tenant = DEFAULT_TENANT if tenant is None else tenant
        order = Order(check_priority(priority), check_tenant(tenant))
        if callback_url is not None:
            check_callback_url(callback_url, self.settings)
        task_id = task_id or str(uuid.uuid4())
        now = time.time()
        first = self._retrying(
            lambda: self._enqueue(
                kind, payload, task_id, now, idempotency_key, deadline_s, order, callback_url
            )
        )
        if first is not None:
            return Job(self, first, kind=kind, schema_model=schema_model)
        return Job(self, task_id, kind=kind, schema_model=schema_model, submitted=True)

    def submit_many(
        self,
        kind: str,
        payloads: Iterable[dict[str, Any]],
        *,
        deadline_s: float | None = None,
        priority: int = DEFAULT_PRIORITY,
        tenant: str | None = None,
        callback_url: str | None = None,
        chunk: int = SUBMIT_CHUNK,
    ) -> list[Job]:
        """Submit one task per payload, admitting ``chunk`` of them per pipelined round trip.

        For many small tasks, such as a corpus embedded one task per input: each is a task of
        its own, with its own id, events and result, admitted as :meth:`submit` admits it, and
        the jobs come back in the order of ``payloads``. Every payload is validated first, so a
        bad one raises before anything is enqueued. A refusal (:class:`ModelNotFound`,
        :class:`QueueFull`) is raised once the chunk that met it is through, and no later chunk
        is sent; its ``info["submitted"]`` lists the ids of the tasks that were admitted. The
        keywords mean what they mean for :meth:`submit`, for every task.
        """
        if chunk < 1:
            raise InvalidRequest("chunk must be at least 1", field="chunk")
        valid = [
            validate_payload(kind, {k: v for k, v in data.items() if v is not None}, self.settings)
            for data in payloads
        ]
        order = Order(check_priority(priority), check_tenant(tenant or DEFAULT_TENANT))
        if callback_url is not None:
            check_callback_url(callback_url, self.settings)
        jobs: list[Job] = []
        for start in range(0, len(valid), chunk):
            steps = []
            for payload in valid[start : start + chunk]:
                if large_images(payload, self.settings):
                    check_served(self.redis, payload.model, self.settings)
                    store_large_images(self.redis, payload, self.settings)
                now, task_id = time.time(), str(uuid.uuid4())
                step = self._admit_step(
                    kind, payload, task_id, now, deadline_s, order, callback_url
                )
                steps.append(replace(step, served_since=served_since(self.settings, now)))
            answers = self._retrying(partial(self.scheduler.run_admissions, steps))
            jobs += [Job(self, step.message.task_id, kind=kind, submitted=True) for step in steps]
            refused = [admission for admission, _ in answers if not admission.admitted]
            if refused:
                admitted = [a.task_id for a, _ in answers if a.admitted]
                try:
                    self._refuse(refused[0])
                except CorralError as exc:
                    done = [job.id for job in jobs[:start]] + admitted
                    exc.with_info(submitted=done)
                    raise
        return jobs

    def _retrying(self, enqueue: Callable[[], T]) -> T:
        """Run ``enqueue`` until Redis answers, for up to ``reconnect_budget_s``: a retry after
        a lost reply admits the same task ids again, which changes nothing."""
        deadline = time.monotonic() + self.reconnect_budget_s
        while True:
            try:
                return enqueue()
            except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(
                        f"cannot enqueue on Redis at {masked(self.settings.redis_url)}: {exc}; "
                        "check that Redis runs and CORRAL_REDIS_URL points at it"
                    ) from exc
                time.sleep(0.25)  # Redis is restarting: nothing was accepted yet, try again
            except redis.RedisError as exc:
                raise BrokerUnavailable(f"Redis refused the submission: {exc}") from exc

    def _enqueue(
        self,
        kind: str,
        payload: Any,
        task_id: str,
        now: float,
        idempotency_key: str | None,
        deadline_s: float | None,
        order: Order,
        callback_url: str | None = None,
    ) -> str | None:
        """Admit, record and release what has room, in one step. Returns the first task's id
        for a repeated idempotency key.

        A retry after a lost reply admits the same task id again, which changes nothing.
        """
        idem = None if idempotency_key is None else idempotency_key_name(idempotency_key)
        if idem is not None and (first := self._first_task(idem, task_id)) is not None:
            return first
        # A model nobody serves is refused before anything is stored: here when images or an
        # idempotency key come first, else in the admission step.
        checked = idem is not None or bool(large_images(payload, self.settings))
        if checked:
            check_served(self.redis, payload.model, self.settings)
            store_large_images(self.redis, payload, self.settings)  # validated: now store blobs
        if idem is not None:
            taken = not self.redis.set(idem, task_id, nx=True, ex=self.settings.idempotency_ttl_s)
            if taken and (first := self._first_task(idem, task_id)) is not None:
                return first
        step = self._admit_step(kind, payload, task_id, now, deadline_s, order, callback_url)
        if not checked:
            step = replace(step, served_since=served_since(self.settings, time.time()))
        admission, _ = self.scheduler.run_admission(step)
        if not admission.admitted:
            self._forget(idem, task_id)
            self._refuse(admission)
        return None

    def _admit_step(
        self,
        kind: str,
        payload: Any,
        task_id: str,
        now: float,
        deadline_s: float | None,
        order: Order,
        callback_url: str | None,
    ) -> AdmitStep:
        """The task's message, record and admission, ready for the scheduler."""
        queue = queue_name(payload.model)
        kwargs = {"payload": dump_payload(payload), "submitted_at": now, "deadline_s": deadline_s}
        spec = registry.get(kind)
        headers = {} if spec.units is None else {UNITS_HEADER: spec.units(payload)}
        message = self.builder.build(
            spec.task_name, kwargs=kwargs, task_id=task_id, queue=queue, headers=headers
        )
        record: dict[str, str | int | float] = {
            "kind": kind,
            "model": payload.model,
            "queue": queue,
            "submitted_at": now,
            "priority": order.priority,
            "tenant": order.tenant,
        }
        if callback_url is not None:
            record[CALLBACK_FIELD] = callback_url
        return AdmitStep(
            message,
            model=payload.model,
            submitted_at=now,
            hosts=tuple(self.releaser.hosts_for(payload.model)),
            tenant=order.tenant,
            priority=order.priority,
            slots=self.releaser.capacity(payload.model),
            record=record,
            record_ttl_s=self.settings.result_ttl_s,
        )

    def _refuse(self, admission: Admission) -> None:
        """Raise what a refused admission means: nobody serves the model, or its queue is full."""
        if not admission.served:
            raise unserved(self.redis, admission.model, self.settings)
        admission.raise_if_refused()

    def _first_task(self, idem: str, task_id: str) -> str | None:
        """The task an idempotency key already names, if it is another one."""
        first = self.redis.get(idem)
        return first.decode() if first is not None and first.decode() != task_id else None

    def _forget(self, idem: str | None, task_id: str) -> None:
        """A refused submission leaves nothing behind (the admission wrote no record): its
        idempotency key goes too."""
        if idem is not None:
            self._forget_key(keys=[idem], args=[task_id])

    @property
    def builder(self) -> MessageBuilder:
        """Builds task messages with Celery's own send_task (opened on first use)."""
        with self._builder_lock:
            if self._builder is None:
                self._builder = MessageBuilder(self.app)
            return self._builder

    def batch(
        self, lines_or_path: str | Path | Iterable[dict[str, Any] | str], **options: Any
    ) -> Batch:
        """Run a batch: a JSONL file's path, or lines as dicts or JSON text, each
        ``{custom_id, method, url, body}`` as in OpenAI's Batch API (docs/batches.md).

        Options: ``priority`` (default 2, the batch lane), ``tenant``, ``completion_window_s``
        (default ``CORRAL_BATCH_COMPLETION_WINDOW_S``), ``endpoint``, ``metadata``, ``owner``,
        ``key`` (the same input with another key is another batch; with the same key,
        submitting again resumes or returns the first batch) and ``callback_url`` (where its
        ``batch.completed``, ``.failed``, ``.expired`` or ``.cancelled`` webhook goes).
        """
        return submit_batch(self, lines_or_path, **options)

    def results(self, jobs: Sequence[Job], timeout: float | None = None) -> list[TaskResult]:
        """Every job's result, in order: ``[job.result(timeout) for job in jobs]``, with the
        finished ones read many per round trip. Raises the first failed task's error."""
        return results(jobs, timeout)

    def job(self, task_id: str) -> Job:
        """A handle on an already submitted task."""
        return Job(self, task_id)

    def conversation(self, model: str, system: str | None = None) -> Conversation:
        return Conversation(self, model, system=system)

    def prepare_images(
        self, images: Iterable[ImageInput], field: str = "images"
    ) -> list[dict[str, Any]]:
        """Check images given as paths, bytes or base64. Nothing is stored yet: once the whole
        payload validated, :meth:`submit` stores the large ones in Redis, sent by reference."""
        return prepare_images(images, self.settings, field)

    def prepare_messages(self, messages: Sequence[MessageLike]) -> list[dict[str, Any]]:
        """Messages as dicts, with their images prepared (see :meth:`prepare_images`)."""
        return self._messages(messages)

    def _messages(self, messages: Sequence[MessageLike]) -> list[dict[str, Any]]:
        if not isinstance(messages, list | tuple):
            raise InvalidRequest(
                "messages: expected a list of messages such as [{'role': 'user', 'content': "
                f"'...'}}], got {type(messages).__name__}",
                field="messages",
            )
        out = []
        for index, message in enumerate(messages):
            if isinstance(message, BaseModel):
                item = message.model_dump(exclude_none=True)
            elif isinstance(message, Mapping):
                item = dict(message)
            else:
                raise InvalidRequest(
                    f"messages[{index}]: expected a message such as {{'role': 'user', "
                    f"'content': '...'}}, got {type(message).__name__}",
                    field="messages",
                )
            if item.get("images"):
                item["images"] = prepare_images(
                    item["images"], self.settings, f"messages[{index}].images"
                )
            out.append(item)
        return out
