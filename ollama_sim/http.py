"""A small HTTP/1.1 server on asyncio protocols.

It does what the simulator needs and nothing more: keep-alive, pipelining, Content-Length and
chunked request bodies, ``Expect: 100-continue``, HEAD, and chunked streaming responses whose
headers leave only together with the first chunk. A peer that disconnects cancels the task
handling its request, which is how the API notices clients that gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"
TEXT_TYPE = "text/plain; charset=utf-8"

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_ids = itertools.count(1)


class ClientDisconnected(ConnectionError):
    """The peer closed the connection while we were still answering."""


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    body: bytes
    peer_port: int
    request_id: str
    keep_alive: bool


Handler = Callable[[Request, "Response"], Awaitable[None]]


class _DateCache:
    second = -1
    value = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second, cls.value = now, formatdate(now, usegmt=True).encode()
        return cls.value


class Response:
    """The answer to one request. Either ``send`` once, or ``write`` chunks then ``end``."""

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self._head_only = request.method == "HEAD"
        self._keep_alive = request.keep_alive
        self.status: int | None = None
        self.started = False
        self.finished = False
        self._stream_type = NDJSON_TYPE
        self._stream_status = 200

    @property
    def disconnected(self) -> bool:
        return self._conn.lost

    def _head(self, status: int, content_type: str, extra: bytes) -> bytes:
        self.status = status
        connection = b"" if self._keep_alive else b"Connection: close\r\n"
        return b"".join(
            (
                b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Unknown").encode()),
                b"Content-Type: ",
                content_type.encode(),
                b"\r\nDate: ",
                _DateCache.get(),
                b"\r\n",
                connection,
                extra,
                b"\r\n",
            )
        )

    def send(self, status: int, body: bytes = b"", content_type: str = JSON_TYPE) -> None:
        """Send a complete response with a Content-Length."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = self.finished = True
        head = self._head(status, content_type, b"Content-Length: %d\r\n" % len(body))
        self._conn.write(head if self._head_only else head + body)

    def prepare_stream(self, status: int = 200, content_type: str = NDJSON_TYPE) -> None:
        """Choose the status line of a stream; nothing is sent until the first chunk."""
        self._stream_status, self._stream_type = status, content_type

    async def write(self, *chunks: bytes) -> None:
        """Send chunks (each one HTTP chunk), with the headers before the first."""
        if self._conn.lost:
            raise ClientDisconnected
        parts = []
        if not self.started:
            self.started = True
            parts.append(
                self._head(
                    self._stream_status, self._stream_type, b"Transfer-Encoding: chunked\r\n"
                )
            )
        for chunk in chunks:
            if chunk:
                parts.append(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self._conn.write(b"".join(parts))
        await self._conn.drain()

    async def end(self) -> None:
        """Finish a chunked stream."""
        if not self.started:
            await self.write()
        self.finished = True
        self._conn.write(b"0\r\n\r\n")
        await self._conn.drain()

    def abort(self) -> None:
        """Drop the connection without (finishing) a response."""
        self.finished = True
        self._conn.close()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sent_continue = False
        self.peer_port = 0
        self.lost = False

    # --- protocol callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer_port = peer[1] if isinstance(peer, tuple) and len(peer) > 1 else 0

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next_request()

    def eof_received(self) -> bool | None:
        return None  # close our side too: a half-closed HTTP client has gone

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._wake_drain()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_drain()

    # --- helpers used by Response --------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ClientDisconnected
        if not self._paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiter = waiter
        await waiter
        if self.lost:
            raise ClientDisconnected

    def _wake_drain(self) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    # --- parsing -------------------------------------------------------------------------------

    def _next_request(self) -> None:
        try:
            request = self._parse()
        except BadRequest as exc:
            body = f"{exc.status} {_REASONS.get(exc.status, 'Bad Request')}".encode()
            head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n" % (
                exc.status,
                _REASONS.get(exc.status, "Bad Request").encode(),
            )
            self.write(
                head + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.close()
            return
        if request is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve(request))

    def _parse(self) -> Request | None:
        buf = self._buffer
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise BadRequest(431, "headers too large")
            return None
        lines = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        while lines and not lines[0]:
            lines.pop(0)  # tolerate stray CRLF between pipelined requests
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest(400, "malformed header")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        body_start = head_end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parsed = self._chunked_body(body_start)
            if parsed is None:
                self._maybe_continue(headers)
                return None
            body, consumed = parsed
        else:
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                raise BadRequest(400, "bad content-length") from None
            if length < 0 or length > MAX_BODY_BYTES:
                raise BadRequest(413 if length > 0 else 400, "bad content-length")
            if len(buf) < body_start + length:
                self._maybe_continue(headers)
                return None
            body, consumed = bytes(buf[body_start : body_start + length]), body_start + length
        del buf[:consumed]
        self._sent_continue = False
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (
            version == "HTTP/1.1" or "keep-alive" in connection
        )
        split = urlsplit(target)
        return Request(
            method=method,
            path=unquote(split.path) or "/",
            query=dict(parse_qsl(split.query)),
            version=version,
            headers=headers,
            body=body,
            peer_port=self.peer_port,
            request_id=f"r{next(_ids)}",
            keep_alive=keep_alive,
        )

    def _maybe_continue(self, headers: dict[str, str]) -> None:
        if not self._sent_continue and headers.get("expect", "").lower() == "100-continue":
            self._sent_continue = True
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _chunked_body(self, pos: int) -> tuple[bytes, int] | None:
        buf = self._buffer
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            try:
                size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            except ValueError:
                raise BadRequest(400, "bad chunk size") from None
            pos = line_end + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    return None
                return bytes(body), trailer_end + 4
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos : pos + size]
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(413, "body too large")
            pos += size + 2

    async def _serve(self, request: Request) -> None:
        response = Response(self, request)
        try:
            await self._server.handler(request, response)
        except (asyncio.CancelledError, ClientDisconnected):
            self.close()
            return
        except Exception:
            if not response.started:
                response.send(500, b'{"error":"internal simulator error"}')
            else:
                self.close()
            self._server.log_exception(request)
        finally:
            self._task = None
        if not response.finished:
            self.close()  # a stream that was never ended cannot be reused
        elif not request.keep_alive or self.lost:
            self.close()
        elif self._buffer:
            self._next_request()


class HttpServer:
    """Serve ``handler`` on a TCP socket."""

    def __init__(self, handler: Handler, on_error: Callable[[Request], None] | None = None) -> None:
        self.handler = handler
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._on_error = on_error

    def log_exception(self, request: Request) -> None:
        if self._on_error is not None:
            self._on_error(request)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
        )
        address = self._server.sockets[0].getsockname()
        return address[0], address[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)
