"""Task messages built by Celery and kombu themselves, held back instead of pushed.

The scheduler stores a task's broker message at admission and pushes it at release. That
message must be byte-for-byte what ``app.send_task`` would have pushed, so a worker cannot tell
the difference. Rather than rebuild kombu's envelope (body encoding, delivery tag, properties,
the Redis list), :class:`MessageBuilder` runs the real ``send_task`` through a transport
whose only change is its last step: ``_put`` keeps the message instead of the ``LPUSH``.
Everything before that step is Celery's and kombu's own code, including the queue declaration.

Two of ``send_task``'s own steps are given their result instead of repeated: the queue's
declaration after the first message for it (kombu remembers a declared queue per connection and
sends nothing again either), and Celery's ``saferepr`` of the arguments for Flower and the
events, which :func:`short_repr` writes faster, cut at the same length.

Celery's ``task-sent`` event, which ``send_task`` publishes after the push, is kept back too
(:attr:`ReadyMessage.events`): a refused admission must not announce a task. Once the task is
admitted, the admission step publishes them (:meth:`Scheduler.admit_and_release`), as kombu's
fanout publish would have.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

from celery import Celery
from kombu import Connection
from kombu.utils.json import dumps

from tasks import broker
from tasks.errors import InvalidRequest


@dataclass(frozen=True)
class ReadyMessage:
    """A task message as kombu's Redis transport would push it."""

    task_id: str
    queue: str  # the Celery queue, e.g. corral.llama3.2:latest
    queue_key: str  # the Redis list kombu pushes to (the queue's one list: see PRIORITY_STEPS)
    raw: str  # the JSON kombu pushes
    delivery_tag: str
    events: tuple[tuple[str, str], ...] = ()  # task-sent events held back: (topic, message)

    @property
    def ledger_entry(self) -> str:
        """The ledger's record of this message, as :func:`tasks.broker.add_to_ledger` writes it."""
        return str(dumps([self.queue_key, self.raw]))

    @property
    def sent_events(self) -> int:
        return len(self.events)


_GIVEN_REPRS = ("argsrepr", "kwargsrepr")


class _HoldingChannel(broker.Channel):
    """The project's channel, except that a task-queue push is held, not sent."""

    held: list[tuple[str, str, str, str]]  # queue, its Redis list, delivery tag, message
    held_events: list[tuple[str, str]]  # topic, message

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        properties = message.get("properties", {})
        for given in _GIVEN_REPRS:  # send_task copies them there too; its own reprs are not
            properties.pop(given, None)
        tag = properties.get("delivery_tag")
        self.held.append((queue, self._queue_key(queue, message), str(tag), dumps(message)))

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any
    ) -> None:
        payload = dumps(message)
        topics: list[str] = self._get_publish_topics(exchange, routing_key)  # type: ignore[no-untyped-call]  # kombu
        self.held_events += [(topic, payload) for topic in topics]


class _HoldingTransport(broker.Transport):
    Channel = _HoldingChannel


class MessageBuilder:
    """Builds :class:`ReadyMessage` objects with ``app.send_task``; safe to share between threads.

    It keeps one broker connection open (the queue declaration still goes to Redis, as with a
    real publish): :meth:`close` it, or use it as a context manager.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.connection = Connection(
            app.conf.broker_url,
            transport=_HoldingTransport,
            transport_options=app.conf.broker_transport_options,
        )
        self.lock = threading.Lock()
        self._producer: Any = None  # made on first use, under the lock
        self._declared: set[str] = set()  # queues declared through this connection

    def close(self) -> None:
        self.connection.release()

    def __enter__(self) -> MessageBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(
        self, name: str, *, kwargs: dict[str, Any], task_id: str, queue: str, **options: Any
    ) -> ReadyMessage:
        """The message ``app.send_task(name, kwargs=..., task_id=..., queue=..., **options)``
        would push."""
        amqp = self.app.amqp
        options.setdefault("argsrepr", "()")
        options.setdefault("kwargsrepr", short_repr(kwargs, amqp.kwargsrepr_maxsize))
        with self.lock:
            channel = cast(_HoldingChannel, self.connection.default_channel)
            channel.held, channel.held_events = [], []
            if self._producer is None or self._producer.channel is not channel:
                self._producer = amqp.Producer(channel)
            if queue in self._declared:
                options.setdefault("declare", [])
            self.app.send_task(
                name,
                kwargs=kwargs,
                task_id=task_id,
                queue=queue,
                producer=self._producer,
                **options,
            )
            self._declared.add(queue)
            held, events = channel.held, channel.held_events
        if len(held) != 1:
            raise InvalidRequest(
                f"task {name!r} for queue {queue!r} did not make exactly one message; route it "
                "to one model queue",
                field="queue",
            )
        queue_name, queue_key, tag, raw = held[0]
        return ReadyMessage(task_id, queue_name, queue_key, raw, tag, tuple(events))


def short_repr(value: Any, limit: int) -> str:
    """``repr(value)`` cut to ``limit`` characters as Celery's ``saferepr`` cuts it (with
    ``...``): what Flower shows of a task's arguments or result. Dicts, lists and tuples are
    written piece by piece and the writing stops at the limit, so a result of hundreds of
    vectors costs what its first line does (one ``repr`` of it costs 0.25 ms)."""
    pieces: list[str] = []
    size = 0
    for piece in _repr_pieces(value, _REPR_DEPTH):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    text = "".join(pieces)
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


_REPR_DEPTH = 32  # deeper than this, a container is written by repr() whole


def _repr_pieces(value: Any, depth: int) -> Iterator[str]:
    """The text of ``repr(value)``, in pieces, for dicts, lists and tuples (not subclasses)."""
    kind = type(value)
    if depth == 0 or kind not in (dict, list, tuple):
        yield repr(value)
    elif kind is dict:
        yield "{"
        for n, (key, item) in enumerate(value.items()):
            yield f"{', ' if n else ''}{key!r}: "
            yield from _repr_pieces(item, depth - 1)
        yield "}"
    else:
        yield "[" if kind is list else "("
        for n, item in enumerate(value):
            if n:
                yield ", "
            yield from _repr_pieces(item, depth - 1)
        yield "]" if kind is list else ("," if len(value) == 1 else "") + ")"
