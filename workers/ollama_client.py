"""A pooled, retrying ``requests`` client for Ollama's HTTP API, always streaming.

Two layers of retry, each deliberate about POST:
- the transport layer (urllib3 ``Retry``) resends a request that never reached a model: connect
  errors and 502/503/504 answers, with exponential backoff and jitter;
- everything else (a runner crash, a stream cut short) surfaces as a typed :mod:`tasks.errors`
  error for the task's attempt loop, which knows whether tokens were already published.

This module is the only one that names ``requests`` exceptions (see :func:`_translate`).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from tasks.errors import (
    CapabilityError,
    CorralError,
    InvalidRequest,
    ModelNotFound,
    OllamaOverloaded,
    OllamaRequestError,
    OllamaRunnerError,
    OllamaUnavailable,
    TaskCancelled,
    TaskTimeout,
)

DEFAULT_PORT = 11434
RETRYABLE_STATUS = (502, 503, 504)


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
        return Retry(
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
    """Lets another thread stop a stream at once, even while its reader is blocked.

    ``fire()`` shuts the socket down, which wakes a blocked ``recv`` (closing it would not), and
    Ollama sees the connection drop and stops generating.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.fired = False

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


class OllamaClient:
    """One per worker process: a ``requests.Session`` whose pool fits the worker's concurrency."""

    def __init__(self, config: OllamaConfig) -> None:
        self.config = config
        self.base_url = parse_host(config.host)
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy lookups per request; set the host explicitly
        adapter = HTTPAdapter(
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
        """A short GET (``/api/ps``, ``/api/tags``, ``/api/version``)."""
        timeouts = self.config.timeouts
        with _translate(path, None):
            response = self.session.get(
                self.base_url + path, timeout=(timeouts.connect_s, timeouts.stall_s)
            )
            _raise_for_status(response, None)
            return response.json()

    def stream(
        self,
        path: str,
        body: dict[str, Any],
        *,
        should_stop: Callable[[], bool] = lambda: False,
        abort: StreamAbort | None = None,
    ) -> Iterator[dict[str, Any]]:
        """POST ``body`` with ``stream: true`` and yield each NDJSON chunk as a dict.

        Raises a typed error for an error status, an ``{"error": ...}`` line (also the
        pre-v0.12.6 form: HTTP 200 plus one error line), a stream that ends without ``done``, a
        stall longer than the stall timeout, and :class:`TaskCancelled` when ``should_stop()``
        turns true, after closing the response so that Ollama stops generating.
        """
        model = body.get("model")
        try:
            yield from self._stream(path, body, should_stop, abort)
        except CorralError as exc:
            if abort is not None and abort.fired and not isinstance(exc, TaskCancelled):
                raise TaskCancelled("cancelled while generating", model=model) from exc
            raise

    def _stream(
        self,
        path: str,
        body: dict[str, Any],
        should_stop: Callable[[], bool],
        abort: StreamAbort | None,
    ) -> Iterator[dict[str, Any]]:
        timeouts = self.config.timeouts
        model = body.get("model")
        request = {**body, "stream": True}
        with _translate(path, model):
            response = self.session.post(
                self.base_url + path,
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json", "Accept": "application/x-ndjson"},
                timeout=(timeouts.connect_s, timeouts.first_byte_s),
                stream=True,
            )
            with response:
                _raise_for_status(response, model)
                sock = _socket_of(response)
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.settimeout(timeouts.stall_s)  # after the first byte: stall timeout
                if abort is not None:
                    abort.attach(sock)
                seen_chunk = False
                for line in response.iter_lines(chunk_size=65536):
                    if not line:
                        continue
                    chunk = _parse_line(line, model, first=not seen_chunk)
                    seen_chunk = True
                    yield chunk
                    if chunk.get("done"):
                        return
                    if should_stop():
                        raise TaskCancelled("cancelled while generating", model=model)
                raise OllamaRunnerError(
                    "Ollama's stream ended without a final 'done' chunk (connection lost?)",
                    model=model,
                    status=-1,
                )


def _parse_line(line: bytes, model: str | None, *, first: bool) -> dict[str, Any]:
    try:
        chunk = json.loads(line)
    except ValueError as exc:
        raise OllamaRunnerError(
            f"Ollama sent a line that is not JSON: {line[:200]!r}", model=model, status=-1
        ) from exc
    if not isinstance(chunk, dict):
        raise OllamaRunnerError("Ollama sent a line that is not an object", model=model, status=-1)
    if chunk.get("error"):
        message = str(chunk["error"])
        if first:
            # Servers before v0.12.6 answered 200 plus one error line for pre-stream failures.
            raise classify_error(200, message, model)
        raise OllamaRunnerError(
            f"Ollama failed mid-stream: {message}", model=model, status=-1, body=message
        )
    return chunk


def _raise_for_status(response: requests.Response, model: str | None) -> None:
    if response.status_code < 400:
        return
    text = response.text
    try:
        message = str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        message = text.strip()
    raise classify_error(response.status_code, message, model)


_NOT_FOUND = re.compile(r"model ['\"].*['\"] not found|not found, try pulling")
_CAPABILITY = re.compile(r"does not support")
_RUNNER = re.compile(r"runner has unexpectedly stopped|timed out waiting for llama|llama runner")
_BUSY = re.compile(r"server busy|maximum pending requests")


def classify_error(status: int, message: str, model: str | None) -> CorralError:
    """Map an Ollama answer to our error tree: what is retryable, what is permanent."""
    context: dict[str, Any] = {"model": model, "status": status, "body": message}
    if status == 404 or _NOT_FOUND.search(message):
        hint = f"; pull it with `ollama pull {model}`" if model else ""
        return ModelNotFound(f"Ollama has no model {model!r}{hint}", **context)
    if status in (503, 429) or _BUSY.search(message):
        return OllamaOverloaded(f"Ollama is overloaded: {message}", **context)
    if status in (502, 504):
        return OllamaUnavailable(
            f"Ollama is unreachable behind a proxy ({status}): {message}", **context
        )
    if _CAPABILITY.search(message):
        return CapabilityError(f"{message}; use a model that has this capability", **context)
    if status == 500 and _RUNNER.search(message):
        return OllamaRunnerError(f"Ollama's model runner failed: {message}", **context)
    if status == 400:
        return InvalidRequest(f"Ollama refused the request: {message}", **context)
    if status == 200:  # legacy in-band error before the first token
        if _RUNNER.search(message):
            return OllamaRunnerError(f"Ollama's model runner failed: {message}", **context)
        return OllamaRequestError(f"Ollama refused the request: {message}", **context)
    return OllamaRequestError(f"Ollama answered {status}: {message}", **context)


def _socket_of(response: requests.Response) -> socket.socket | None:
    connection = getattr(response.raw, "connection", None) or getattr(
        response.raw, "_connection", None
    )
    return getattr(connection, "sock", None)


@contextlib.contextmanager
def _translate(path: str, model: str | None) -> Iterator[None]:
    """The one boundary where ``requests`` exceptions become ours."""
    try:
        yield
    except CorralError:
        raise
    except requests.exceptions.ConnectTimeout as exc:
        raise OllamaUnavailable(f"connecting to Ollama for {path} timed out", model=model) from exc
    except (requests.exceptions.ReadTimeout, TimeoutError) as exc:
        raise TaskTimeout(
            f"Ollama sent nothing for too long on {path} (stall or first-byte timeout)", model=model
        ) from exc
    except requests.exceptions.SSLError as exc:
        raise OllamaRequestError(
            f"TLS to Ollama failed: {exc}; check CORRAL_TLS_CA_BUNDLE or the host's certificate",
            model=model,
        ) from exc
    except requests.exceptions.ConnectionError as exc:
        if "Read timed out" in str(exc):
            raise TaskTimeout(f"Ollama stalled on {path}", model=model) from exc
        raise OllamaUnavailable(
            f"cannot reach Ollama for {path}: {_reason(exc)}", model=model
        ) from exc
    except requests.exceptions.ChunkedEncodingError as exc:
        if "timed out" in str(exc):
            raise TaskTimeout(f"Ollama stalled mid-stream on {path}", model=model) from exc
        raise OllamaRunnerError(
            f"Ollama's stream broke on {path}: {_reason(exc)}", model=model, status=-1
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise OllamaUnavailable(
            f"request to Ollama for {path} failed: {_reason(exc)}", model=model
        ) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 300 else text[:300] + "…"
