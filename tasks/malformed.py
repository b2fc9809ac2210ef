"""Task messages a worker cannot run end as typed failures: none is dropped, none stops a worker.

Left to Celery, a malformed message on a corral queue is dropped with a log line (a body it
cannot decode: "Can't decode message body"; an unknown task name; no task headers), fails in
Celery's tracer before corral's code runs (too many positional arguments: a bare TypeError, and
the task's stream never ends), or stops the worker ("Unrecoverable error" for a body that is
not Celery's ``[args, kwargs, embed]``), after which it comes back and stops the next one.

The worker's consumer (Celery's ``worker_consumer`` setting) checks each message before Celery
takes it apart, and settles the ones it cannot run:

- with a readable task id, an :class:`InvalidRequest` naming what was wrong becomes the task's
  one terminal ``error`` event and its stored result, as if the task had run and failed;
- without one, the message goes to the dead-letter queue (``corral dlq list``) with its raw
  body, under ``message:<delivery tag>``;
- either way it is acknowledged, so it is not delivered again.

Items on a queue that are not kombu messages at all reach the consumer as stand-ins from the
transport (:func:`tasks.broker.stand_in`) and are settled the same way.
"""

from __future__ import annotations

import base64
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message
from vine import promise

from tasks.broker import UNREADABLE_HEADER
from tasks.definitions import CorralTask
from tasks.errors import InvalidRequest
from tasks.keys import QUEUE_PREFIX, log_key, stream_channel
from tasks.lifecycle import Lease, add_dead_letter
from tasks.publisher import StreamPublisher
from tasks.settings import Settings

log = logging.getLogger("corral.worker")

MAX_TASK_ID = 200  # longer "ids" are not read as ids: the message goes to the dead letters
MAX_DETAIL = 300  # characters of a decoder's complaint kept in the error message
SEND_HINT = (
    "; send tasks with the corral SDK, CLI or gateway, or as Celery protocol 2 JSON "
    "(body [args, kwargs, embed])"
)


def find_problem(app: Celery, message: Message) -> InvalidRequest | None:
    """What keeps Celery from running ``message`` as one of ``app``'s tasks, or None."""
    headers = message.headers
    if isinstance(headers, dict) and UNREADABLE_HEADER in headers:
        return _invalid(
            f"the queue held an item that is not a kombu message ({headers[UNREADABLE_HEADER]})",
            "message",
        )
    if not isinstance(headers, dict) or not isinstance(headers.get("task"), str):
        return _invalid("the message has no Celery task headers (protocol 2)", "headers.task")
    name = headers["task"]
    if name not in app.tasks:
        return _invalid(f"no task is named {name[:MAX_TASK_ID]!r}", "headers.task")
    if read_task_id(message) is None:
        return _invalid("the message has no readable task id", "headers.id")
    try:
        body = message.decode()
    except Exception as exc:  # kombu wraps most in DecodeError; refused content types too
        return _invalid(f"the body cannot be decoded: {_detail(exc)}", "body")
    if not isinstance(body, list | tuple) or len(body) != 3:
        return _invalid("the body is not Celery's [args, kwargs, embed]", "body")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        return _invalid("the positional arguments (body[0]) are not a list", "args")
    if not isinstance(kwargs, dict):
        return _invalid("the keyword arguments (body[1]) are not an object", "kwargs")
    if not isinstance(embed, dict):
        return _invalid("the options (body[2]) are not an object", "embed")
    try:
        _signature(app.tasks[name].run).bind(*args, **kwargs)
    except TypeError as exc:
        return _invalid(f"the arguments do not fit {name}: {exc}", "args")
    return None


@functools.lru_cache(maxsize=256)
def _signature(run: Callable[..., Any]) -> inspect.Signature:
    """A task's signature, read once (``inspect.signature`` takes four times as long as the
    check of a message against it, in the consumer thread every message goes through)."""
    return inspect.signature(run)


def read_task_id(message: Message) -> str | None:
    """The message's task id, if it has one that can serve as an id."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id")
    if isinstance(task_id, str) and 0 < len(task_id) <= MAX_TASK_ID and task_id.isprintable():
        return task_id
    return None


def _invalid(reason: str, field: str) -> InvalidRequest:
    return InvalidRequest(f"malformed task message: {reason}{SEND_HINT}", field=field)


def _detail(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "…"


class Settler:
    """Ends what cannot run: a typed failure for a task id, else a dead letter."""

    def __init__(self, app: Celery, client: redis.Redis, settings: Settings, worker: str) -> None:
        self.app = app
        self.redis = client
        self.settings = settings
        self.worker = worker

    def settle(self, message: Message, problem: InvalidRequest) -> str:
        """``failed`` (the task ended with ``problem``), ``ended`` (it had already ended) or
        ``dead-lettered``."""
        task_id = read_task_id(message)
        if task_id is not None:
            outcome = self.fail(task_id, problem)
            if outcome is not None:
                return outcome
        self.dead_letter(message, problem)
        return "dead-lettered"

    def fail(self, task_id: str, problem: InvalidRequest) -> str | None:
        """End the task with ``problem``, through the same claim as a run, so that a cancel
        or an earlier outcome is kept. None if another worker runs a task with this id."""
        error = problem.with_info(task_id=task_id)
        publisher = StreamPublisher(
            self.redis,
            task_id=task_id,
            channel=stream_channel(task_id),
            log_key=log_key(task_id),
            maxlen=self.settings.stream_maxlen,
            ttl_s=self.settings.stream_ttl_s,
        )
        publisher.open()
        if publisher.finished_event is not None:
            return "ended"
        lease = Lease(self.redis, task_id, self.settings.lease_ttl_s, delivery_tag=None)
        begun = lease.begin(self.worker, time.time(), self.settings.result_ttl_s)
        if begun == "leased":
            return None
        if begun == "cancelled":  # cancelled while queued: the cancel wrote its outcome
            return "ended"
        try:
            publisher.finish("error", error=error.to_dict())
            self.app.backend.mark_as_failure(task_id, error)
        finally:
            lease.release("failed")
        return "failed"

    def dead_letter(self, message: Message, problem: InvalidRequest) -> None:
        tag = str(message.delivery_tag or uuid.uuid4().hex)
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        try:
            raw, encoding = body.decode(), "utf-8"
        except UnicodeDecodeError:
            raw, encoding = base64.b64encode(body).decode(), "base64"
        headers = message.headers if isinstance(message.headers, dict) else {}
        add_dead_letter(
            self.redis,
            f"message:{tag}",
            {
                "error": problem.to_dict(),
                "queue": (message.delivery_info or {}).get("routing_key"),
                "headers": {k: v for k, v in headers.items() if k != UNREADABLE_HEADER},
                "content_type": message.content_type,
                "raw_body": raw,
                "raw_body_encoding": encoding,
            },
        )


def _from_task_queue(message: Message) -> bool:
    return str((message.delivery_info or {}).get("routing_key") or "").startswith(QUEUE_PREFIX)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, settling the messages it cannot run instead of dropping them or
    dying of them. Installed with the ``worker_consumer`` setting."""

    _settler: Settler | None = None

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], None]:
        run = super().create_task_handler(promise)

        def on_task_received(message: Message) -> None:
            problem = find_problem(self.app, message)
            if problem is None:
                try:
                    run(message)
                    return
                except (redis.RedisError, OSError):
                    raise  # the broker's trouble, not the message's: Celery reconnects
                except Exception as exc:
                    # Anything else would stop the worker, and the message would come back.
                    problem = _invalid(f"Celery could not take it apart: {_detail(exc)}", "headers")
            self.settle(message, problem)

        return on_task_received

    # Celery's own hooks for what it cannot run: the check above meets most of these first.
    def on_decode_error(self, message: Message, exc: Exception) -> None:
        if not _from_task_queue(message):  # e.g. a remote-control message
            super().on_decode_error(message, exc)
            return
        self.settle(message, _invalid(f"the body cannot be decoded: {_detail(exc)}", "body"))

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self.settle(message, _invalid("the message has no Celery task headers", "headers.task"))

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        self.settle(message, _invalid(f"no such task: {_detail(exc)}", "headers.task"))

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self.settle(message, _invalid(f"Celery refused it: {_detail(exc)}", "headers"))

    def settle(self, message: Message, problem: InvalidRequest) -> None:
        """Settle ``message`` and acknowledge it; on a Redis error, put it back for later."""
        try:
            outcome = self._settler_for().settle(message, problem)
        except redis.RedisError as exc:
            log.error(
                "cannot settle malformed message %s (%s); it is put back on its queue",
                message.delivery_tag,
                exc,
            )
            message.reject_log_error(log, self.connection_errors, requeue=True)
            return
        except Exception:
            log.exception("cannot settle malformed message %s; dropped", message.delivery_tag)
        else:
            log.warning(
                "malformed message %s (task %s) %s: %s",
                message.delivery_tag,
                read_task_id(message),
                outcome,
                problem.message,
            )
            if outcome == "failed" and self.event_dispatcher is not None:  # Flower, exporter
                failure = f"InvalidRequest({problem.message!r})"
                self.event_dispatcher.send(
                    "task-failed", uuid=read_task_id(message), exception=failure
                )
        message.ack_log_error(log, self.connection_errors)

    def _settler_for(self) -> Settler:
        if self._settler is None:
            rt = CorralTask.runtime_for(self.app)  # the one the announcement uses, too
            self._settler = Settler(self.app, rt.redis, rt.settings, str(self.hostname))
        return self._settler
