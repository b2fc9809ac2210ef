"""The Python SDK: validate, record, enqueue on the model's queue, hand back a :class:`Job`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from producers.conversation import Conversation
from producers.events import PubSubPool
from producers.images import ImageInput, prepare_images, store_large_images
from producers.jobs import Job
from tasks.app import create_app
from tasks.errors import BrokerUnavailable, InvalidRequest
from tasks.keys import MODELS_KEY, queue_name, task_key
from tasks.keys import idempotency_key as idempotency_key_name
from tasks.kinds import KindMethods, registry
from tasks.kinds.base import MessageLike
from tasks.payloads import dump_payload, validate_payload
from tasks.redis_url import masked
from tasks.settings import Settings, load_settings


class Client(KindMethods):
    """Submit tasks: one method per task kind (``generate``, ``chat``, ``structured``,
    ``multimodal``...; see ``tasks/kinds/``). Needs only ``CORRAL_REDIS_URL``."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings(redis_url=redis_url)
        self.app = create_app(self.settings, main="corral-producer")
        # One result-backend client for every thread (Celery makes one per thread otherwise),
        # so that close() can close its connections.
        self.backend = self.app.backend
        self.redis = redis.Redis.from_url(self.settings.redis_url, health_check_interval=10)
        self.pubsubs = PubSubPool(self.redis)
        self.reconnect_budget_s = 15.0  # how long a submission waits for Redis to come back

    def close(self) -> None:
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
    ) -> Job:
        """Validate ``data`` as a ``kind`` payload and enqueue it on its model's queue.

        ``deadline_s`` (default ``CORRAL_TASK_DEADLINE_S``) covers queue wait plus run time.
        With ``idempotency_key``, a second submission within ``CORRAL_IDEMPOTENCY_TTL_S`` returns
        the first task's handle and enqueues nothing. ``task_id`` (default: a new UUID) is for
        callers that must name the task before it exists, e.g. to count it against a limit.
        """
        clean = {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data
        payload = validate_payload(kind, clean, self.settings)
        task_id = task_id or str(uuid.uuid4())
        now = time.time()
        deadline = time.monotonic() + self.reconnect_budget_s
        while True:
            try:
                first = self._enqueue(kind, payload, task_id, now, idempotency_key, deadline_s)
                break
            except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(
                        f"cannot enqueue on Redis at {masked(self.settings.redis_url)}: {exc}; "
                        "check that Redis runs and CORRAL_REDIS_URL points at it"
                    ) from exc
                time.sleep(0.25)  # Redis is restarting: nothing was accepted yet, try again
            except redis.RedisError as exc:
                raise BrokerUnavailable(f"Redis refused the submission: {exc}") from exc
        if first is not None:
            return Job(self, first, kind=kind, schema_model=schema_model)
        return Job(self, task_id, kind=kind, schema_model=schema_model)

    def _enqueue(
        self,
        kind: str,
        payload: Any,
        task_id: str,
        now: float,
        idempotency_key: str | None,
        deadline_s: float | None,
    ) -> str | None:
        """Record, then publish. Returns the first task's id for a repeated idempotency key.

        A retry after a lost reply may publish the same task id twice; the worker runs it once.
        """
        store_large_images(self.redis, payload, self.settings)  # validated: now store blobs
        if idempotency_key is not None:
            key = idempotency_key_name(idempotency_key)
            if not self.redis.set(key, task_id, nx=True, ex=self.settings.idempotency_ttl_s):
                first = self.redis.get(key)
                if first is not None and first.decode() != task_id:
                    return first.decode()
        queue = queue_name(payload.model)
        pipe = self.redis.pipeline(transaction=False)
        record = {"kind": kind, "model": payload.model, "queue": queue, "submitted_at": now,
                  "state": "queued"}  # fmt: skip
        pipe.hset(task_key(task_id), mapping=record)
        pipe.expire(task_key(task_id), self.settings.result_ttl_s)
        pipe.sadd(MODELS_KEY, payload.model)
        pipe.execute()
        self.app.send_task(
            registry.get(kind).task_name,
            kwargs={
                "payload": dump_payload(payload),
                "submitted_at": now,
                "deadline_s": deadline_s,
            },
            task_id=task_id,
            queue=queue,
        )
        return None

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
