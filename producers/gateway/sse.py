"""Streaming helpers: Server-Sent Events framing, and noticing a client that went away."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")
SSE = "text/event-stream"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: dict[str, Any]) -> bytes:
    """One stream event as one SSE event: ``id`` is its ``seq``, ``event`` its type.

    A ``queued`` event (``seq`` -1) is not in the task's log: it goes without an ``id``, so
    that Last-Event-ID stays put, as for a warning."""
    data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event['seq']}\n" if event["seq"] >= 0 else ""
    return f"{head}event: {event['type']}\ndata: {data}\n\n".encode()


SSE_PING = b": ping\n\n"


def sse_warning(warning: dict[str, Any]) -> bytes:
    """A ``warning`` event without an ``id``: not a task event, so Last-Event-ID stays put."""
    data = json.dumps(warning, separators=(",", ":"), ensure_ascii=False)
    return f"event: warning\ndata: {data}\n\n".encode()


class Disconnected(Exception):
    """The client closed its connection while we were waiting."""


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then raise :class:`Disconnected`).

    Before the response starts nobody else reads ``receive``, so an idle wait (queue, model
    load) would never notice a client that gave up.
    """
    outcome: dict[str, Any] = {}

    async with anyio.create_task_group() as group:

        async def run() -> None:
            outcome["value"] = await awaitable
            group.cancel_scope.cancel()

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    group.cancel_scope.cancel()
                    return

        group.start_soon(run)
        group.start_soon(watch)
    if "value" not in outcome:
        raise Disconnected
    return outcome["value"]  # type: ignore[no-any-return]


class DisconnectAwareStream(StreamingResponse):
    """Always cancels the body when the client disconnects, whatever ASGI version the server
    speaks (Starlette relies on a failing ``send`` under ASGI 2.4, which a quiet stream never
    triggers)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            async def listen() -> None:
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(listen)
        if self.background is not None:
            await self.background()
