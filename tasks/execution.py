"""One task run inside a worker: stream from Ollama, relay the chunks, retry, fetch images.

Every kind's runner (``tasks/kinds/``) streams from Ollama through an :class:`Execution`, which
relays the chunks through the task's :class:`~tasks.publisher.StreamPublisher`. Retryable
failures get further attempts here, in the same worker slot, and an attempt that follows
published tokens starts with a ``restart`` event.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from tasks.errors import (
    InvalidRequest,
    RetryableError,
    TaskCancelled,
    TaskTimeout,
)
from tasks.images import decode_base64_image, encode_base64, inspect_image
from tasks.keys import blob_key
from tasks.ollama_boundary import ollama_errors
from tasks.payloads import ImagePart, Message
from tasks.publisher import StreamPublisher
from tasks.results import Timings
from tasks.settings import Settings
from workers.batcher import Batcher
from workers.ollama_client import OllamaClient, StreamAbort

if TYPE_CHECKING:
    from tasks.take_along import TakeAlong

T = TypeVar("T")


def task_clock(
    submitted_at: Any, deadline_s: Any, started: float, settings: Settings
) -> tuple[Timings, float]:
    """A delivery's timings and deadline (time.time() after which no new attempt starts), from
    its message's ``submitted_at`` and ``deadline_s`` (the settings' deadline when not given)."""
    enqueued = float(submitted_at) if isinstance(submitted_at, int | float) else started
    valid_deadline = isinstance(deadline_s, int | float) and deadline_s > 0
    deadline = enqueued + (float(deadline_s) if valid_deadline else settings.task_deadline_s)
    return Timings(enqueued_at=enqueued, started_at=started), deadline


@dataclass
class Reply:
    """What one streamed call to Ollama produced."""

    text: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


@dataclass
class Execution:
    """One task run: its tools, its clock and its running attempt count."""

    task_id: str
    settings: Settings
    ollama: OllamaClient
    redis: redis.Redis
    publisher: StreamPublisher
    timings: Timings
    deadline: float  # time.time() after which no new attempt starts
    batcher: Batcher  # the process's: gathers embed tasks into shared calls
    abort: StreamAbort | None = None  # fired by the lease heartbeat on cancel
    take_along: TakeAlong | None = None  # for kinds that serve pending tasks in their calls
    attempts: int = 0

    # -- streaming ---------------------------------------------------------------------
    def stream(self, path: str, body: dict[str, Any]) -> Reply:
        """Stream one request from Ollama, relaying tokens; the result of a single attempt.

        The chunks after the first are handled on the process's body pump thread while this
        one sleeps (:meth:`OllamaClient.relay`): nothing else touches the publisher meanwhile.
        The text this thread reads itself (what was there to read at once) is held back until
        the relay pauses, or joins the terminal event: a short answer costs one write.
        """
        reply = Reply()
        texts: list[str] = []  # joined once at the end: adding to a str copies it each time
        thoughts: list[str] = []
        is_chat = path == "/api/chat"
        text_key = "content" if is_chat else "response"
        emit = self.publisher.emit
        reader = threading.get_ident()

        def on_chunk(chunk: dict[str, Any]) -> None:
            hold = threading.get_ident() == reader  # not the pump: the relay says when to send
            part = chunk.get("message") or {} if is_chat else chunk
            thinking = part.get("thinking")
            text = part.get(text_key)
            if thinking:
                thoughts.append(thinking)
                self._first_token()
                emit("thinking", text=thinking, hold=hold)
            if text:
                texts.append(text)
                self._first_token()
                emit("token", text=text, hold=hold)
            if part.get("tool_calls"):
                reply.tool_calls.extend(part["tool_calls"])
            if chunk.get("done"):
                reply.final = chunk

        with ollama_errors():
            self.ollama.relay(
                path,
                body,
                on_chunk,
                should_stop=self._should_stop,
                abort=self.abort,
                on_pause=self.publisher.send_held,
                on_sent=self._sent,
            )
        reply.text, reply.thinking = "".join(texts), "".join(thoughts)
        return reply

    def _sent(self) -> None:
        """The request to Ollama is on its way: now read the answer of a start step sent
        ahead of it (:meth:`StreamPublisher.settle`), which may say to stop."""
        self.publisher.settle()
        if self.publisher.cancel_requested:
            raise TaskCancelled("cancelled before it started", task_id=self.task_id)

    def stop_signal(self) -> tuple[threading.Event, float]:
        """An event that a cancel sets, and the seconds left before the deadline: what a thread
        waiting on something else sleeps on instead of polling :meth:`check`."""
        event = threading.Event()
        if self.abort is not None:
            self.abort.also_set(event)
        return event, max(0.0, self.deadline - time.time())

    def check(self) -> None:
        """Raise if the task must stop now: a cancel was requested, or its deadline passed."""
        if self._should_stop():
            raise TaskCancelled("cancelled while running", task_id=self.task_id)

    def _should_stop(self) -> bool:
        if time.time() > self.deadline:
            raise TaskTimeout(
                "the task's deadline passed while generating",
                task_id=self.task_id,
            )
        return self.publisher.cancel_requested

    def _first_token(self) -> None:
        if self.timings.first_token_at is None:
            self.timings.first_token_at = time.time()

    # -- attempts ----------------------------------------------------------------------
    def with_attempts(self, call: Callable[[], T]) -> T:
        """Run ``call`` until it succeeds, fails permanently, or the attempt budget is spent."""
        limit = self.settings.task_attempts
        for attempt in range(1, limit + 1):
            self.attempts += 1
            if attempt > 1 and self.publisher.text_since_start:
                self.publisher.emit(
                    "restart", attempt=self.attempts, reason="retrying after a failure"
                )
            try:
                return call()
            except RetryableError as exc:
                exc.with_info(attempts=self.attempts, task_id=self.task_id)
                backoff_s = self._backoff(attempt)
                if attempt == limit or time.time() + backoff_s > self.deadline:
                    raise
                self._sleep_unless_cancelled(backoff_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        base = self.settings.retry_backoff_s * (2 ** (attempt - 1))
        return float(min(self.settings.retry_backoff_max_s, base) * random.uniform(0.5, 1.0))

    def _sleep_unless_cancelled(self, seconds: float) -> None:
        """Back off; the lease heartbeat raises the publisher's cancel flag meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
            if self.publisher.cancel_requested:
                raise TaskCancelled("cancelled while waiting to retry", task_id=self.task_id)

    # -- images ------------------------------------------------------------------------
    def image_b64(self, image: ImagePart | str, where: str) -> str:
        """Base64 for Ollama, fetching blobs sent by reference, re-checking every image."""
        max_bytes = self.settings.max_image_bytes
        if isinstance(image, str):
            data = decode_base64_image(image, field=where)
        elif image.data is not None:
            data = decode_base64_image(image.data, field=where)
        else:
            stored = self.redis.get(blob_key(image.sha256))
            if stored is None:
                raise InvalidRequest(
                    f"{where}: the image sent by reference ({image.sha256[:12]}…) has expired; "
                    "submit the task again (or raise CORRAL_BLOB_TTL_S)",
                    field=where,
                )
            data = bytes(stored)
        inspect_image(
            data, max_bytes=max_bytes, max_pixels=self.settings.max_image_pixels, field=where
        )
        return encode_base64(data)

    def messages_json(self, messages: list[Message]) -> list[dict[str, Any]]:
        out = []
        for i, message in enumerate(messages):
            item = message.model_dump(mode="json", exclude_none=True, exclude={"images"})
            if message.images:
                item["images"] = [
                    self.image_b64(img, f"messages[{i}].images[{j}]")
                    for j, img in enumerate(message.images)
                ]
            out.append(item)
        return out
