"""What can go wrong talking to Ollama, said without judging it.

::

    OllamaError                  base: message, model, status (HTTP, if any), body
    ├── OllamaResponseError      Ollama answered an error: an HTTP error status, or an
    │                            ``{"error": ...}`` line in a 200 stream (status 200)
    ├── OllamaConnectError       no connection, or it was lost before any answer came
    ├── OllamaTLSError           the TLS handshake or the certificate check failed
    ├── OllamaTimeout            nothing came in time; ``phase`` says which wait ran out
    ├── OllamaStreamError        the stream broke, was cut short, ended without ``done``,
    │                            or sent a line that is not a JSON object
    └── OllamaStopped            the caller stopped the stream (``should_stop`` or an abort)

These are facts about one HTTP exchange. Whether a failure is worth another attempt, or what
to tell a user, is the caller's decision: the client raises only these, each chained to the
``requests`` or ``urllib3`` exception behind it.
"""

from __future__ import annotations

from typing import Literal

TimeoutPhase = Literal["connect", "first_byte", "stall"]


class OllamaError(Exception):
    """Root of what :class:`~workers.ollama_client.OllamaClient` raises."""

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: int | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.status = status  # the HTTP status of Ollama's answer; None when there was none
        self.body = body

    def __str__(self) -> str:
        return self.message


class OllamaResponseError(OllamaError):
    """Ollama answered with an error.

    Either an HTTP error status (``status`` >= 400, ``body`` Ollama's error text), or an
    ``{"error": ...}`` line inside a 200 stream: before any chunk (how servers before v0.12.6
    report what newer ones answer with a status), or after chunks (``mid_stream``: the
    generation failed part-way).
    """

    status: int

    def __init__(
        self, status: int, body: str, *, model: str | None = None, mid_stream: bool = False
    ) -> None:
        where = "mid-stream" if mid_stream else f"with {status}"
        super().__init__(f"Ollama answered {where}: {body}", model=model, status=status, body=body)
        self.mid_stream = mid_stream


class OllamaConnectError(OllamaError):
    """The connection could not be made (refused, unknown host) or broke before an answer."""


class OllamaTLSError(OllamaError):
    """The TLS handshake failed, or the host's certificate was not trusted."""


class OllamaTimeout(OllamaError):
    """A wait ran out: ``connect``, ``first_byte`` (the answer's headers) or ``stall`` (the
    silence between two chunks)."""

    def __init__(self, message: str, *, phase: TimeoutPhase, model: str | None = None) -> None:
        super().__init__(message, model=model)
        self.phase: TimeoutPhase = phase


class OllamaStreamError(OllamaError):
    """The stream broke, was cut short, ended without a ``done`` chunk, or sent a bad line."""


class OllamaStopped(OllamaError):
    """The caller asked the stream to stop; the connection was closed."""
