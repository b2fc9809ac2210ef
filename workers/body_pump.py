"""One thread per process reads the streamed bodies of every running generation.

Read by its task's own thread, a token costs that thread a wake-up from ``recv``, a wait for the
GIL and a switch back: at hundreds of slow streams (a token every 33 ms each) the switches cost
the worker more than the tokens. The :class:`BodyPump` waits on every stream's socket at once
(``epoll``), reads whichever are ready, and hands each NDJSON line to its stream's callback,
while the task threads sleep until their stream ends. Where there is no ``epoll`` (not Linux),
:data:`AVAILABLE` is false and each task's thread reads its own stream. Streams that arrive
together are read in one wake-up, and the thread that decodes them is mostly already running.

The HTTP framing is decoded here too (:class:`ChunkedLines`): an Ollama stream is a chunked body,
a line per chunk, and decoding it with a few byte operations per read costs less than the layers
of generators of a general HTTP client. Nothing here knows HTTP clients or Ollama's errors: the
caller (:mod:`workers.ollama_client`) hands over a socket and gets back what happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Literal

MAX_CHUNK_LINE = 1024  # a chunk's size line (hex size and extensions)
READ_SIZE = 65536
SWEEP_S = 0.1  # how often stalls are looked for (the precision of a stall timeout)
AVAILABLE = hasattr(select, "epoll")

log = logging.getLogger(__name__)


class ChunkedError(ValueError):
    """The body is not valid chunked transfer coding."""


class ChunkedLines:
    """An incremental decoder of a chunked HTTP body carrying newline-delimited lines.

    :meth:`feed` takes bytes as they come off the socket and gives back the complete lines they
    finish (without their newline, empty ones left out); a line may span chunks and reads.
    :attr:`ended` turns true at the body's last chunk and its trailer; :attr:`extra` counts the
    bytes seen past it.
    """

    __slots__ = ("_raw", "_left", "_crlf", "_trailer", "_partial", "ended", "extra")

    def __init__(self) -> None:
        self._raw = b""  # framing not decoded yet
        self._left = 0  # bytes of the current chunk's data still to come
        self._crlf = False  # the CRLF after a chunk's data is expected next
        self._trailer = False  # after the last chunk: trailer lines up to an empty one
        self._partial = b""  # the start of a line whose newline has not come yet
        self.ended = False
        self.extra = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.ended:
            self.extra += len(data)
            return []
        raw = self._raw + data if self._raw else data
        body: list[bytes] = []
        at, size = 0, len(raw)
        while at < size:
            if self._left:
                end = min(size, at + self._left)
                body.append(raw[at:end])
                self._left -= end - at
                at = end
                self._crlf = not self._left
                continue
            if self._crlf:
                if size - at < 2:
                    break
                if raw[at : at + 2] != b"\r\n":
                    raise ChunkedError("a chunk's data is not followed by CRLF")
                at += 2
                self._crlf = False
                continue
            eol = raw.find(b"\r\n", at)
            if eol < 0:
                if size - at > MAX_CHUNK_LINE:
                    raise ChunkedError("a chunk's size line is too long")
                break
            line = raw[at:eol]
            at = eol + 2
            if self._trailer:
                if not line:
                    self.ended = True
                    self.extra = size - at
                    at = size
                continue
            try:
                length = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise ChunkedError(f"a chunk's size line is not hex: {line[:40]!r}") from None
            if length < 0:
                raise ChunkedError("a chunk's size is negative")
            if length == 0:
                self._trailer = True
            self._left = length
        self._raw = raw[at:] if at < size else b""
        if not body:
            return []
        text = self._partial + b"".join(body) if self._partial else b"".join(body)
        lines = text.split(b"\n")
        self._partial = lines.pop()
        return [line for line in lines if line.strip()]

    @property
    def mid_chunk(self) -> bool:
        """Part of a chunk (its size line, data or CRLF) is still to come."""
        return bool(self._left or self._raw or self._crlf)

    @property
    def pending(self) -> bool:
        """Part of a line is still waiting for its newline."""
        return bool(self._partial.strip())


class StreamFailed(Exception):
    """The pump stopped reading a stream: it ``broke`` (a socket error, bad framing, a close
    inside a chunk), was ``cut`` (closed between chunks before its last line) or ``stalled``."""

    def __init__(self, message: str, kind: Literal["broke", "cut", "stalled"] = "broke") -> None:
        super().__init__(message)
        self.kind = kind


class PumpedStream:
    """One body handed to the pump: its socket (set non-blocking), decoder and line callback.

    ``on_line`` gets each line and returns True for the last one the caller wants (Ollama's
    ``done`` chunk); the pump then reads up to ``end_wait_s`` more for the body's end, so that the
    connection can be kept. What the pump ended with is in :attr:`error` (the callback's own
    exception, or a :class:`StreamFailed`) and :attr:`reusable` once :attr:`ended` is set.
    """

    def __init__(
        self,
        sock: socket.socket,
        decoder: ChunkedLines,
        on_line: Callable[[bytes], bool],
        *,
        stall_s: float,
        end_wait_s: float,
    ) -> None:
        self.sock = sock
        self.decoder = decoder
        self.on_line = on_line
        self.stall_s = stall_s
        self.end_wait_s = end_wait_s
        self.last_read = time.monotonic()
        self.finished = False  # the callback has had its last line
        self.error: BaseException | None = None
        self.reusable = False
        self.ended = threading.Event()

    def read(self) -> bool:
        """Read what the socket has; True once the stream is over for the pump."""
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            return self._fail(StreamFailed(f"the stream broke: {exc}"))
        self.last_read = time.monotonic()
        if not data:
            if self.finished:
                return True  # closed after its last line: done, but not reusable
            if self.decoder.mid_chunk:
                return self._fail(StreamFailed("the connection closed inside a chunk"))
            return self._fail(StreamFailed("the connection closed before the last line", "cut"))
        try:
            lines = self.decoder.feed(data)
        except ChunkedError as exc:
            return self._fail(StreamFailed(str(exc))) if not self.finished else True
        if self.finished:
            return self._body_end()
        for line in lines:
            try:
                last = self.on_line(line)
            except BaseException as exc:  # handed to the task's thread, which raises it
                return self._fail(exc)
            if last:
                self.finished = True
                self.last_read = time.monotonic()  # from now on, end_wait_s runs
                return self._body_end()
        return False

    def overdue(self, now: float) -> bool:
        """Whether it waited too long: a stall before its last line, the body's end after."""
        if self.finished:
            return now - self.last_read > self.end_wait_s
        if now - self.last_read > self.stall_s:
            self._fail(StreamFailed("the stream stalled", "stalled"))
            return True
        return False

    def _body_end(self) -> bool:
        decoder = self.decoder
        if decoder.extra or decoder.pending:
            return True  # more than the last line: the connection is not worth keeping
        if decoder.ended:
            self.reusable = True
            return True
        return False

    def _fail(self, error: BaseException) -> bool:
        self.error = error
        return True


class BodyPump:
    """Reads every :class:`PumpedStream` of the process from one daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._incoming: list[PumpedStream] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poll = select.epoll()
        self._poll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._streams: dict[int, PumpedStream] = {}  # by file descriptor
        self._thread: threading.Thread | None = None

    @classmethod
    def of_process(cls) -> BodyPump:
        """This process's pump (made on first use)."""
        global _pump
        with _pump_lock:
            if _pump is None:
                _pump = cls()
            return _pump

    def read(self, stream: PumpedStream) -> None:
        """Hand ``stream`` to the pump; its ``ended`` event is set when the pump is done with it
        (and has let go of its socket)."""
        stream.sock.settimeout(0.0)
        stream.last_read = time.monotonic()
        with self._lock:
            self._incoming.append(stream)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="body-pump", daemon=True)
                self._thread.start()
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already pending
            self._wake_w.send(b"\0")

    def wait(self, stream: PumpedStream) -> None:
        """Block until the pump is done with ``stream``; fails it if the pump's thread died."""
        while not stream.ended.wait(1.0):
            thread = self._thread
            if thread is None or not thread.is_alive():
                stream.error = StreamFailed("the body pump stopped")
                return

    def _run(self) -> None:
        while True:
            try:
                self._serve()
            except Exception:  # every stream of the process needs this thread: keep it
                log.exception("the body pump failed a round; its streams are failed")
                for fd, stream in list(self._streams.items()):
                    stream.error = stream.error or StreamFailed("the body pump failed")
                    self._end(fd, stream)

    def _serve(self) -> None:
        poll, streams, wake = self._poll.poll, self._streams, self._wake_r.fileno()
        next_sweep = time.monotonic() + SWEEP_S
        while True:
            timeout = max(0.0, next_sweep - time.monotonic()) if streams else -1
            for fd, _ in poll(timeout):
                if fd == wake:
                    self._take_incoming()
                    continue
                stream = streams.get(fd)
                if stream is not None and stream.read():
                    self._end(fd, stream)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_S
                for fd, stream in [(f, s) for f, s in streams.items() if s.overdue(now)]:
                    self._end(fd, stream)

    def _take_incoming(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for stream in incoming:
            try:
                fd = stream.sock.fileno()
                self._poll.register(fd, select.EPOLLIN)
            except (OSError, ValueError) as exc:  # closed meanwhile
                stream.error = StreamFailed(f"the stream broke: {exc}")
                stream.ended.set()
                continue
            self._streams[fd] = stream

    def _end(self, fd: int, stream: PumpedStream) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._poll.unregister(fd)
        del self._streams[fd]
        stream.ended.set()


_pump_lock = threading.Lock()
_pump: BodyPump | None = None


def _forget_pump() -> None:
    """A forked child has none of its parent's threads: it makes a pump of its own."""
    global _pump, _pump_lock
    _pump_lock = threading.Lock()
    _pump = None


os.register_at_fork(after_in_child=_forget_pump)
