"""OpenAI's reply shapes for a task: the whole object, SSE chunks, and errors.

The reply is relayed from the task's event stream. As in the Ollama facade, a streamed reply's
headers wait for the first token, so that an error before it keeps its status, and a client
that goes away cancels its task. Errors use OpenAI's ``{"error": {...}}`` shape with the status
codes the ``openai`` SDKs map to their exception classes.
"""

from __future__ import annotations

import abc
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from producers.gateway.relay import follow
from producers.gateway.service import Gateway, Submitted
from producers.gateway.sse import (
    SSE,
    SSE_HEADERS,
    DisconnectAwareStream,
    Disconnected,
    until_disconnect,
)
from tasks.errors import CorralError, TaskCancelled, error_from_dict
from tasks.events import TERMINAL_TYPES
from tasks.openai.errors import described, error_body
from tasks.openai.replies import (
    chat_completion,
    embedding_list,
    text_completion,
    text_of,
    tool_calls,
    usage,
)

REQUEST_ID = "x-request-id"
DONE_LINE = b"data: [DONE]\n\n"
_END: Any = object()
Events = AsyncGenerator[dict[str, Any] | None, None]

_TYPES = {"str", "int", "float", "bool", "list", "dict", "none"}  # union members in a ``loc``


# -- errors, and the request id every reply carries ------------------------------------------
def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(status, message, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


def error_of(exc: CorralError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A typed error (refused at the door or raised by the task) in OpenAI's shape."""
    status, body = described(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def invalid_body(exc: ValidationError) -> JSONResponse:
    """A refused request body: every problem, and ``param`` naming the first."""
    found = [(_where(e["loc"]), str(e["msg"]).removeprefix("Value error, ")) for e in exc.errors()]
    # A value that fits no member of a union fails once per member: keep the deepest story.
    found = [
        (w, m) for w, m in found if not any(o.startswith((f"{w}.", f"{w}[")) for o, _ in found)
    ]
    problems = "; ".join(f"{where}: {message}" for where, message in found)
    return openai_error(
        400,
        f"invalid request: {problems}; fix it and send the request again",
        param=found[0][0] if found else None,
        code="invalid_request",
    )


def _where(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content", "list[...]", 1)`` → ``messages[0].content[1]``: the field
    as the request spells it, without the names pydantic gives a union's members."""
    parts = [p for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _TYPES)]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
    return where.lstrip(".") or "body"


# -- replies ---------------------------------------------------------------------------------
class Shaper(abc.ABC):
    """Builds one request's OpenAI objects; the subclasses know chat and text completions."""

    object_whole = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, submitted: Submitted, model: str, include_usage: bool) -> None:
        self.id = self.id_prefix + submitted.job.id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        # A structured reply may be corrected once: stream it only once it is validated.
        self.whole_only = submitted.kind == "structured"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk_head(self) -> dict[str, Any]:
        # With include_usage, OpenAI gives every chunk a usage field: null but in the last one.
        nulled = {"usage": None} if self.include_usage else {}
        return {**self.head(self.object_chunk), **nulled}

    def finish_reason(self, result: dict[str, Any]) -> str:
        return "length" if result.get("done_reason") == "length" else "stop"

    @abc.abstractmethod
    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        """The reply object of a request that is not streamed."""

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        """One streamed chunk; only shapes that stream (chat, completions) define it."""
        raise NotImplementedError(f"{type(self).__name__} replies are never streamed")

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        """The last chunks: what was not streamed yet, the finish reason, the usage."""
        raise NotImplementedError(f"{type(self).__name__} replies are never streamed")

    def usage_chunk(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.head(self.object_chunk), "choices": [], "usage": usage(result)}]


class ChatShaper(Shaper):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def tool_calls(self, result: dict[str, Any], indexed: bool) -> list[dict[str, Any]]:
        return tool_calls(result, self.id, indexed)

    def finish_reason(self, result: dict[str, Any]) -> str:
        if (result.get("message") or {}).get("tool_calls"):
            return "tool_calls"
        return super().finish_reason(result)

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        return chat_completion(result, reply_id=self.id, model=self.model, created=self.created)

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.chunk_head(), "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        return self._chunk({"reasoning_content": thinking} if thinking else {"content": text})

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        chunks = []
        if not streamed:
            text, thinking = text_of(result)
            if thinking:
                chunks.append(self._chunk({"reasoning_content": thinking}))
            if text:
                chunks.append(self._chunk({"content": text}))
        if calls := self.tool_calls(result, indexed=True):
            chunks.append(self._chunk({"tool_calls": calls}))
        chunks.append(self._chunk({}, self.finish_reason(result)))
        return [*chunks, *self.usage_chunk(result)]


class CompletionShaper(Shaper):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        return text_completion(result, reply_id=self.id, model=self.model, created=self.created)

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        if not text:
            return None  # the legacy shape has no place for thinking
        return {**self.chunk_head(), "choices": [self._choice(text, None)]}

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        text = "" if streamed else text_of(result)[0]
        last = {
            **self.chunk_head(),
            "choices": [self._choice(text, self.finish_reason(result))],
        }
        return [last, *self.usage_chunk(result)]


class EmbeddingShaper(Shaper):
    """An ``embed`` task's vectors as OpenAI's embedding list; never streamed."""

    def __init__(self, submitted: Submitted, model: str, encoding_format: str) -> None:
        super().__init__(submitted, model, include_usage=False)
        self.encoding_format = encoding_format

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        return embedding_list(result, model=self.model, encoding_format=self.encoding_format)


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def reply(
    request: Request, gw: Gateway, submitted: Submitted, shaper: Shaper, *, stream: bool
) -> Response:
    job = submitted.job
    headers = {**submitted.headers, REQUEST_ID: job.id}
    events = follow(gw.redis, job.id, on_idle=lambda: gw.outcome(job))
    wanted = (
        TERMINAL_TYPES
        if not stream or shaper.whole_only
        else ("token", "thinking", *TERMINAL_TYPES)
    )
    try:
        first = await until_disconnect(request, _next_of(events, wanted))
    except Disconnected:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await _cancel(submitted)
        return Response(status_code=499, headers=headers)
    if first["type"] in TERMINAL_TYPES and first["type"] != "done":
        await events.aclose()
        return error_of(_error_of(first), headers)
    if not stream:
        await events.aclose()
        return JSONResponse(shaper.whole(first["result"]), headers=headers)
    body = _chunks(gw, submitted, shaper, first, events)
    return DisconnectAwareStream(body, media_type=SSE, headers={**SSE_HEADERS, **headers})


async def _next_of(events: Events, types: tuple[str, ...]) -> dict[str, Any]:
    async for event in events:
        if event is not None and event["type"] in types:
            return event
    raise CorralError(
        "the task's event stream ended without a terminal event; see the task's "
        "status with GET /v1/tasks/{id}"
    )


def _error_of(terminal: dict[str, Any]) -> CorralError:
    if terminal["type"] == "cancelled":
        return TaskCancelled(str(terminal.get("reason") or "the task was cancelled"))
    return error_from_dict(terminal.get("error") or {})


def _stream_error(error: CorralError) -> bytes:
    """An error after the stream began: the ``openai`` SDKs raise ``APIError`` on it."""
    return sse(described(error)[1])


async def _chunks(
    gw: Gateway, submitted: Submitted, shaper: Shaper, first: dict[str, Any], events: Events
) -> AsyncIterator[bytes]:
    finished, streamed = False, False
    try:
        for opening in shaper.opening():
            yield sse(opening)
        event: dict[str, Any] | None = first
        while True:
            if event is not None:
                kind = event["type"]
                if kind in ("token", "thinking"):
                    text = event["text"]
                    delta = shaper.delta(
                        **({"text": text} if kind == "token" else {"thinking": text})
                    )
                    if delta is not None:
                        streamed = True
                        yield sse(delta)
                elif kind == "restart" and streamed:
                    # Sent text cannot be taken back: end the stream with an error, as Ollama does.
                    yield _stream_error(
                        CorralError(
                            "the model failed mid-stream and the task "
                            "started over; send the request again"
                        )
                    )
                    return
                elif kind == "done":
                    finished = True
                    for chunk in shaper.closing(event["result"], streamed):
                        yield sse(chunk)
                    yield DONE_LINE
                    return
                elif kind in TERMINAL_TYPES:
                    finished = True
                    yield _stream_error(_error_of(event))
                    return
            event = await anext(events, _END)
            if event is _END:
                return
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        if not finished:
            await _cancel(submitted)


async def _cancel(submitted: Submitted) -> None:
    """Cancel the task of a client that went away (shielded: we are often being cancelled)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(CorralError):
        await run_in_threadpool(submitted.job.cancel)


__all__ = [
    "ChatShaper",
    "CompletionShaper",
    "EmbeddingShaper",
    "error_of",
    "invalid_body",
    "openai_error",
    "reply",
]
