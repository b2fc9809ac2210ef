"""A pooled, retrying ``requests`` client for Ollama's HTTP API, always streaming.

Two layers of retry, each deliberate about POST:
- the transport layer (urllib3 ``Retry``) resends a request that never reached a model: connect
  errors and 502/503/504 answers, with exponential backoff and jitter;
- everything else (a runner crash, a stream cut short) surfaces as an
  :mod:`workers.ollama_errors` error for the caller, which knows whether tokens were already
  published and whether another attempt is worth it.

A :class:`StreamAbort` stops a request from another thread at any moment: while Ollama has not
answered yet (a model load, its own queue), mid-stream, or in a retry's backoff. For that the
client owns its connections: they report their socket once the request is sent, before the
wait for the first byte, which no hook of ``requests`` or ``urllib3`` offers.

This module is the only one that names ``requests`` and ``urllib3`` exceptions
(see :func:`_transport_errors`).
"""

from __future__ import annotations

import contextlib
import io
import json
import select
import socket
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
import requests
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_errors
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.response import BaseHTTPResponse, HTTPResponse
from urllib3.util.retry import Retry

from workers.body_pump import AVAILABLE as PUMP_AVAILABLE
from workers.body_pump import (
    READ_SIZE,
    BodyPump,
    ChunkedError,
    ChunkedLines,
    PumpedStream,
    StreamFailed,
)
from workers.ollama_errors import (
    OllamaConnectError,
    OllamaError,
    OllamaResponseError,
    OllamaStopped,
    OllamaStreamError,
    OllamaTimeout,
    OllamaTLSError,
)

DEFAULT_PORT = 11434
RETRYABLE_STATUS = (502, 503, 504)
BODY_END_TIMEOUT_S = 1.0  # after the last chunk, how long to wait for the body's end
HOLD_BYTES = 65536  # text read at once is held back at most this long (bytes of the body)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 300.0  # queue wait + model load + prompt eval pass in silence
    stall_s: float = 60.0  # once streaming, the longest gap between two chunks


@dataclass(frozen=True)
class RetryPolicy:
    transport_retries: int = 4
    backoff_s: float = 0.5
    backoff_max_s: float = 10.0

    def urllib3_retry(self) -> Retry:
        return _AbortableRetry(
            total=self.transport_retries,
            connect=self.transport_retries,
            read=0,  # a request that reached the model is not resent blindly
            status=self.transport_retries,
            other=0,
            allowed_methods=None,  # POST included, on purpose: nothing was generated yet
            status_forcelist=RETRYABLE_STATUS,
            backoff_factor=self.backoff_s,
            backoff_max=self.backoff_max_s,
            backoff_jitter=self.backoff_s / 2,
            raise_on_status=False,
            respect_retry_after_header=True,
        )


@dataclass(frozen=True)
class TLSConfig:
    verify: bool = True
    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@dataclass(frozen=True)
class OllamaConfig:
    host: str = f"http://127.0.0.1:{DEFAULT_PORT}"
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TLSConfig = field(default_factory=TLSConfig)
    pool_size: int = 4


def parse_host(host: str | None) -> str:
    """Normalise ``OLLAMA_HOST`` the way Ollama's clients do: scheme, host and port 11434."""
    raw = (host or "").strip() or "127.0.0.1"
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    scheme = parts.scheme or "http"
    hostname = parts.hostname or "127.0.0.1"
    if hostname == "0.0.0.0":
        hostname = "127.0.0.1"
    if ":" in hostname:
        hostname = f"[{hostname}]"
    port = parts.port or (443 if scheme == "https" and ":" not in parts.netloc else DEFAULT_PORT)
    path = parts.path.rstrip("/")
    return f"{scheme}://{hostname}:{port}{path}"


class StreamAbort:
    """Lets another thread stop a request at once, even while its reader is blocked.

    ``fire()`` shuts the request's socket down, which wakes a blocked ``recv`` (closing it would
    not), and Ollama sees the connection drop: it leaves its queue or stops generating. A socket
    attached after ``fire()`` is shut down as it comes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._fired = threading.Event()
        self._also: list[threading.Event] = []

    @property
    def fired(self) -> bool:
        return self._fired.is_set()

    def fire(self) -> None:
        with self._lock:
            self._fired.set()
            self._shutdown()
            for event in self._also:
                event.set()

    def also_set(self, event: threading.Event) -> None:
        """Set ``event`` too when the abort fires (now, if it has): wakes a thread that sleeps
        on something else than a socket, such as a batch it waits for."""
        with self._lock:
            self._also.append(event)
            if self._fired.is_set():
                event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the abort fires."""
        return self._fired.wait(seconds)

    def attach(self, sock: socket.socket | None) -> None:
        """The socket the request now uses; None once it uses none (its connection went back
        to the pool, where another request may take it)."""
        with self._lock:
            self._sock = sock
            if self._fired.is_set():
                self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


@dataclass
class _Exchange:
    """The request sent in this context: its socket, known before any answer, and its abort."""

    abort: StreamAbort | None
    on_sent: Callable[[], None] | None = None  # called once, when the request is first sent
    sock: socket.socket | None = None

    def sent_on(self, sock: socket.socket) -> None:
        self.sock = sock
        if self.abort is not None:
            self.abort.attach(sock)
        on_sent, self.on_sent = self.on_sent, None
        if on_sent is not None:
            on_sent()  # what it raises drops the request (urllib3 closes the connection)

    def between_attempts(self) -> None:
        self.sock = None
        if self.abort is not None:
            self.abort.attach(None)


# Set only around ``session.post``, which runs the connection's ``getresponse`` and the retry's
# ``sleep`` in the calling thread: that is how they find the request they serve.
_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("ollama_exchange", default=None)


class _ReportingHTTPConnection(HTTPConnection):
    """Reports its socket to the request in this context once the request is sent."""

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3's own
        # The request is sent: report the socket before blocking on the answer.
        exchange = _EXCHANGE.get()
        if exchange is not None and self.sock is not None:
            exchange.sent_on(self.sock)
        return super().getresponse()


class _ReportingHTTPSConnection(_ReportingHTTPConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _ReportingHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _ReportingHTTPSConnection


class _Adapter(HTTPAdapter):
    """An adapter whose pools make connections that report their socket."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


class _AbortableRetry(Retry):
    """Backs off on the request's abort, so that a stop also cuts a retry's wait short."""

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        exchange = _EXCHANGE.get()
        if exchange is None or exchange.abort is None:
            super().sleep(response)
            return
        exchange.between_attempts()  # the failed attempt's connection is back in the pool
        retry_after = None
        if response is not None and self.respect_retry_after_header:
            retry_after = self.get_retry_after(response)
        exchange.abort.wait(retry_after or self.get_backoff_time())


class OllamaClient:
    """One per worker process: a ``requests.Session`` whose pool fits the worker's concurrency."""

    def __init__(self, config: OllamaConfig) -> None:
        self.config = config
        self.base_url = parse_host(config.host)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy lookups per request; set the host explicitly
        adapter = _Adapter(
            pool_connections=1,
            pool_maxsize=max(1, config.pool_size),
            max_retries=config.retry.urllib3_retry(),
            pool_block=False,
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        tls = config.tls
        self.session.verify = tls.ca_bundle if (tls.verify and tls.ca_bundle) else tls.verify
        if tls.client_cert:
            self.session.cert = (
                (tls.client_cert, tls.client_key) if tls.client_key else tls.client_cert
            )

    def close(self) -> None:
        self.session.close()

    def get_json(self, path: str) -> dict[str, Any]:
        """A short GET (``/api/tags``, ``/api/version``) with this client's TLS and retries.

        Raises an :class:`~workers.ollama_errors.OllamaError` as :meth:`stream` does.
        """
        timeouts = self.config.timeouts
        with _transport_errors(path, None, waiting="first_byte"):
            response = self.session.get(
                self.base_url + path, timeout=(timeouts.connect_s, timeouts.stall_s)
            )
        with response:
            if response.status_code >= 400:
                raise _response_error(response, None)
            try:
                return dict(response.json())
            except ValueError as exc:
                raise OllamaStreamError(f"Ollama's answer on {path} is not JSON") from exc

    def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` and return Ollama's one JSON answer (``/api/embed``, which does not
        stream: the first-byte timeout covers the whole call).

        Raises an :class:`~workers.ollama_errors.OllamaError` as :meth:`stream` does.
        """
        timeouts = self.config.timeouts
        model = body.get("model")
        with _transport_errors(path, model, waiting="first_byte"):
            response = self.session.post(
                self.base_url + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                timeout=(timeouts.connect_s, timeouts.first_byte_s),
            )
        with response:
            if response.status_code >= 400:
                raise _response_error(response, model)
            try:
                return dict(orjson.loads(response.content))  # an embed answer: vectors by the 100
            except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError included
                raise OllamaStreamError(
                    f"Ollama's answer on {path} is not a JSON object", model=model
                ) from exc

    def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        abort: StreamAbort | None = None,
    ) -> Iterator[dict[str, Any]]:
        """POST ``body`` with ``stream: true`` and yield each NDJSON chunk as a dict.

        Raises an :class:`~workers.ollama_errors.OllamaError`: ``OllamaResponseError`` for an
        error status or an ``{"error": ...}`` line, ``OllamaStreamError`` for a stream that
        breaks or ends without ``done``, ``OllamaTimeout`` when a wait runs out, and
        ``OllamaStopped`` once ``should_stop()`` turns true (asked after each chunk) or
        ``abort`` fires (at once, whatever the request waits for). The connection is closed
        whenever the stream ends early, so that Ollama stops generating.
        """
        with _stopping(path, body.get("model"), abort):
            response, exchange = self._open(path, body, abort)
            with response, _transport_errors(path, body.get("model"), waiting="stall"):
                yield from self._lines(path, body.get("model"), response, exchange, should_stop)

    def relay(
        self,
        path: str,
        body: dict[str, Any],
        on_chunk: Callable[[dict[str, Any]], None],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        abort: StreamAbort | None = None,
        on_pause: Callable[[], None] = lambda: None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """As :meth:`stream`, but each chunk goes to ``on_chunk``, up to ``done``; returns then.

        The first chunk is handled in the calling thread; on a plain HTTP connection the rest are
        read by the process's :class:`~workers.body_pump.BodyPump` and handed to ``on_chunk``
        from its thread, while the calling thread sleeps until the stream ends. Whatever
        ``on_chunk`` or ``should_stop`` raises is raised here, and the stream is dropped. Errors
        as :meth:`stream`'s.

        ``on_pause`` is called in the calling thread whenever it has handed over what it read
        and the rest is not there yet (before it waits, or leaves it to the pump), and at least
        every ``HOLD_BYTES`` read: what ``on_chunk`` held back in this thread goes out then.

        ``on_sent`` is called once the request is sent, before its answer is waited for; what
        it raises leaves at once, and the request is dropped.
        """
        model = body.get("model")
        with _stopping(path, model, abort):
            response, exchange = self._open(path, body, abort, on_sent)
            with response, _transport_errors(path, model, waiting="stall"):
                fp = _body_file(response)
                if fp is None:  # not a plain chunked body: the general reader
                    for chunk in self._lines(path, model, response, exchange, should_stop):
                        on_chunk(chunk)
                        on_pause()  # requests reads ahead: no telling what is there yet
                    return
                lines = _Lines(path, model, on_chunk, should_stop, on_pause)
                with _socket_errors(path, model):
                    self._relay_body(fp, lines, response, exchange)

    def _open(
        self,
        path: str,
        body: dict[str, Any],
        abort: StreamAbort | None,
        on_sent: Callable[[], None] | None = None,
    ) -> tuple[requests.Response, _Exchange]:
        """Send the request; the answer once its headers came with a status below 400."""
        model = body.get("model")
        if abort is not None and abort.fired:
            raise OllamaStopped(f"stopped on request before {path} was sent", model=model)
        exchange = _Exchange(abort, on_sent)
        with _transport_errors(path, model, waiting="first_byte"):
            response = self._post(path, {**body, "stream": True}, exchange)
        if response.status_code >= 400:
            with response, _transport_errors(path, model, waiting="stall"):
                raise _response_error(response, model)
        if exchange.sock is not None:
            with contextlib.suppress(OSError):
                exchange.sock.settimeout(self.config.timeouts.stall_s)  # the first byte came
        return response, exchange

    def _lines(
        self,
        path: str,
        model: str | None,
        response: requests.Response,
        exchange: _Exchange,
        should_stop: Callable[[], bool],
    ) -> Iterator[dict[str, Any]]:
        """Each chunk of the answer, read by ``requests`` in this thread."""
        seen_chunk = False
        lines = response.iter_lines(chunk_size=65536)
        for line in lines:
            if not line:
                continue
            chunk = _parse_line(line, model, mid_stream=seen_chunk)
            seen_chunk = True
            yield chunk
            if chunk.get("done"):
                _read_body_end(lines, exchange)
                return
            if should_stop():
                raise OllamaStopped(f"stopped on request while streaming {path}", model=model)
        raise _cut_short(path, model)

    def _relay_body(
        self, fp: io.BufferedReader, lines: _Lines, response: requests.Response, exchange: _Exchange
    ) -> None:
        """Decode the chunked body here as long as it arrives without a wait (its first chunk
        always), the rest by the pump if it can: an answer already sent whole, such as a short
        one, is read to its end by this thread, with no hand-over to the pump and back."""
        decoder = ChunkedLines()
        sock = exchange.sock
        pump = PUMP_AVAILABLE and sock is not None and type(sock) is socket.socket  # not TLS
        held = 0  # bytes read since the last pause
        while not lines.done:
            data = fp.read1(READ_SIZE)
            if not data and decoder.mid_chunk:
                raise _pump_error(StreamFailed("the connection closed inside a chunk"), lines)
            if not data:
                raise lines.cut_short()
            for line in _feed(decoder, data, lines):
                if lines.take(line):
                    break
            if lines.done:
                break
            held += len(data)
            waits = not _readable(sock)
            if waits or held >= HOLD_BYTES:
                lines.on_pause()
                held = 0
            if waits and pump and lines.seen:
                break  # the rest comes later: the pump waits for it, not this thread
        if not lines.done:
            assert sock is not None
            stream = PumpedStream(
                sock,
                decoder,
                lines.take,
                stall_s=self.config.timeouts.stall_s,
                end_wait_s=BODY_END_TIMEOUT_S,
            )
            pump_of_process = BodyPump.of_process()
            pump_of_process.read(stream)
            pump_of_process.wait(stream)
            if stream.error is not None:
                raise _pump_error(stream.error, lines)
            reusable = stream.reusable
        else:
            reusable = _read_chunked_end(fp, decoder, exchange)
        exchange.between_attempts()  # no abort may shut a socket that goes back to the pool
        if reusable and sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(self.config.timeouts.stall_s)
            _release(response)

    def _post(self, path: str, request: dict[str, Any], exchange: _Exchange) -> requests.Response:
        timeouts = self.config.timeouts
        token = _EXCHANGE.set(exchange)
        try:
            return self.session.post(
                self.base_url + path,
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/x-ndjson"},
                timeout=(timeouts.connect_s, timeouts.first_byte_s),
                stream=True,
            )
        finally:
            _EXCHANGE.reset(token)


def _readable(sock: socket.socket | None) -> bool:
    """Whether a read of ``sock`` would return at once (data, its end, or an error)."""
    if sock is None:
        return False
    poller = select.poll()  # not select(): a worker relaying many streams has fds past 1024
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed: the next read says how
        return True


def _read_body_end(lines: Iterator[bytes], exchange: _Exchange) -> None:
    """Read what follows the last chunk (the chunked body's end, right behind it), so that the
    connection goes back to the pool instead of being closed: the next task reuses it, without a
    new TCP (and TLS) handshake. Anything else, or a wait past ``BODY_END_TIMEOUT_S``, leaves the
    response unread, and closing it drops the connection as before."""
    sock = exchange.sock
    exchange.between_attempts()  # no abort may shut a socket that goes back to the pool
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.settimeout(BODY_END_TIMEOUT_S)
    with contextlib.suppress(requests.RequestException, urllib3_errors.HTTPError, OSError):
        for line in lines:
            if line:
                return  # more than Ollama sends: the connection is not worth keeping


class _Lines:
    """What a relayed stream has seen, and what each of its lines does: parse, hand over, stop."""

    def __init__(
        self,
        path: str,
        model: str | None,
        on_chunk: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], bool],
        on_pause: Callable[[], None] = lambda: None,
    ) -> None:
        self.path = path
        self.model = model
        self.on_chunk = on_chunk
        self.should_stop = should_stop
        self.on_pause = on_pause
        self.seen = False
        self.done = False

    def take(self, line: bytes) -> bool:
        """Handle one line; True for the last one (``done``)."""
        chunk = _parse_line(line, self.model, mid_stream=self.seen)
        self.seen = True
        self.on_chunk(chunk)
        if chunk.get("done"):
            self.done = True
            return True
        if self.should_stop():
            raise OllamaStopped(f"stopped on request while streaming {self.path}", model=self.model)
        return False

    def cut_short(self) -> OllamaStreamError:
        return _cut_short(self.path, self.model)


def _cut_short(path: str, model: str | None) -> OllamaStreamError:
    """A stream that ended before Ollama's last (``done``) chunk."""
    return OllamaStreamError(
        f"Ollama's stream on {path} ended without a final 'done' chunk (connection lost?)",
        model=model,
    )


def _feed(decoder: ChunkedLines, data: bytes, lines: _Lines) -> list[bytes]:
    try:
        return decoder.feed(data)
    except ChunkedError as exc:
        raise OllamaStreamError(
            f"Ollama's stream on {lines.path} broke: {exc}", model=lines.model
        ) from exc


def _pump_error(error: BaseException, lines: _Lines) -> BaseException:
    """What the pump ended a stream with, as this client reports it."""
    if not isinstance(error, StreamFailed):
        return error  # raised by the line's own handling (or its callback): as it is
    if error.kind == "stalled":
        return OllamaTimeout(
            f"Ollama's stream on {lines.path} stalled longer than the stall timeout",
            phase="stall",
            model=lines.model,
        )
    if error.kind == "cut":
        return lines.cut_short()
    return OllamaStreamError(f"Ollama's stream on {lines.path} broke: {error}", model=lines.model)


def _body_file(response: requests.Response) -> io.BufferedReader | None:
    """The buffered socket file under a plain chunked answer, which this module decodes itself;
    None for anything else (a length, a content coding), which ``requests`` reads."""
    raw = response.raw
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if not getattr(raw, "chunked", False) or coding not in ("", "identity"):
        return None
    original = getattr(raw, "_fp", None)
    fp = getattr(original, "fp", None)
    return fp if fp is not None and hasattr(fp, "read1") else None


def _read_chunked_end(fp: io.BufferedReader, decoder: ChunkedLines, exchange: _Exchange) -> bool:
    """Read the chunked body's end after the last line, as :func:`_read_body_end` does; True
    if the connection can go back to the pool."""
    sock = exchange.sock
    if sock is None:
        return False
    with contextlib.suppress(OSError):
        sock.settimeout(BODY_END_TIMEOUT_S)
    try:
        while not decoder.ended:
            data = fp.read1(READ_SIZE)
            if not data:
                return False
            decoder.feed(data)
            if decoder.pending:
                return False
    except (OSError, ChunkedError):
        return False
    return not decoder.extra and not decoder.pending


def _release(response: requests.Response) -> None:
    """Hand a fully read answer's connection back to the pool, as ``urllib3`` does at the end
    of a chunked body it read itself."""
    raw = response.raw
    original = getattr(raw, "_original_response", None)
    if original is not None:
        original.close()
    raw.release_conn()


@contextlib.contextmanager
def _stopping(path: str, model: str | None, abort: StreamAbort | None) -> Iterator[None]:
    """An error caused by the abort firing is reported as the stop it is; the abort lets go of
    the connection on the way out (it may serve another request next)."""
    try:
        yield
    except OllamaError as exc:
        if abort is not None and abort.fired and not isinstance(exc, OllamaStopped):
            raise OllamaStopped(f"stopped on request: {path}", model=model) from exc
        raise
    finally:
        if abort is not None:
            abort.attach(None)


@contextlib.contextmanager
def _socket_errors(path: str, model: str | None) -> Iterator[None]:
    """Errors of a body read straight from the socket, as :func:`_transport_errors` reports
    them once the stream is under way."""
    try:
        yield
    except TimeoutError as exc:
        raise OllamaTimeout(
            f"Ollama's stream on {path} stalled longer than the stall timeout",
            phase="stall",
            model=model,
        ) from exc
    except OSError as exc:
        raise OllamaStreamError(
            f"Ollama's stream on {path} broke: {_reason(exc)}", model=model
        ) from exc


def _parse_line(line: bytes, model: str | None, *, mid_stream: bool) -> dict[str, Any]:
    try:
        chunk = orjson.loads(line)
    except ValueError as exc:
        raise OllamaStreamError(
            f"Ollama sent a line that is not JSON: {line[:200]!r}", model=model
        ) from exc
    if not isinstance(chunk, dict):
        raise OllamaStreamError("Ollama sent a line that is not a JSON object", model=model)
    if chunk.get("error"):
        # Before any chunk, this is how servers before v0.12.6 answered pre-stream failures.
        raise OllamaResponseError(200, str(chunk["error"]), model=model, mid_stream=mid_stream)
    return chunk


def _response_error(response: requests.Response, model: str | None) -> OllamaResponseError:
    text = response.text
    try:
        message = str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        message = text.strip()
    return OllamaResponseError(response.status_code, message, model=model)


@contextlib.contextmanager
def _transport_errors(
    path: str, model: str | None, *, waiting: Literal["first_byte", "stall"]
) -> Iterator[None]:
    """The one boundary where ``requests`` and ``urllib3`` exceptions become ours.

    ``waiting`` says what a read timeout means here: before the answer's headers, Ollama never
    answered; after them, its stream stalled.
    """
    try:
        yield
    except (requests.RequestException, urllib3_errors.HTTPError) as exc:
        raise _translate(exc, path, model, waiting) from exc


def _translate(
    exc: Exception, path: str, model: str | None, waiting: Literal["first_byte", "stall"]
) -> OllamaError:
    cause = _urllib3_cause(exc)
    reason = _reason(cause or exc)
    if isinstance(exc, requests.exceptions.SSLError) or isinstance(cause, urllib3_errors.SSLError):
        return OllamaTLSError(f"TLS to Ollama failed on {path}: {reason}", model=model)
    if isinstance(cause, urllib3_errors.NewConnectionError):  # a ConnectTimeoutError subclass
        return OllamaConnectError(f"cannot reach Ollama for {path}: {reason}", model=model)
    if isinstance(cause, urllib3_errors.ConnectTimeoutError):
        return OllamaTimeout(
            f"connecting to Ollama for {path} timed out", phase="connect", model=model
        )
    if isinstance(cause, urllib3_errors.ReadTimeoutError):
        if waiting == "first_byte":
            message = f"Ollama did not start answering {path} within the first-byte timeout"
        else:
            message = f"Ollama's stream on {path} stalled longer than the stall timeout"
        return OllamaTimeout(message, phase=waiting, model=model)
    if waiting == "stall":
        return OllamaStreamError(f"Ollama's stream on {path} broke: {reason}", model=model)
    return OllamaConnectError(f"cannot reach Ollama for {path}: {reason}", model=model)


def _urllib3_cause(exc: BaseException) -> BaseException | None:
    """The urllib3 exception that says what happened.

    ``requests`` raises its own exceptions while handling urllib3's, so the chain holds it; a
    ``MaxRetryError`` carries the last attempt's error as its documented ``reason``.
    """
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, urllib3_errors.MaxRetryError):
            return current.reason
        if isinstance(current, urllib3_errors.HTTPError):
            return current
        current = current.__cause__ or current.__context__
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "…"
