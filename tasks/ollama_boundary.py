"""Where the Ollama client's errors become corral's: what is retryable, what is permanent.

The client (:mod:`workers.ollama_client`) says what happened in neutral terms
(:mod:`workers.ollama_errors`); :func:`ollama_errors` is the one boundary that turns those facts
into the error tree of :mod:`tasks.errors`, chained with ``raise ... from``. Tasks call the
client through it (:func:`translated` for a stream).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any, TypeVar

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
from workers.ollama_errors import (
    OllamaError,
    OllamaResponseError,
    OllamaStopped,
    OllamaStreamError,
    OllamaTimeout,
    OllamaTLSError,
)

T = TypeVar("T")

_NOT_FOUND = re.compile(r"model ['\"].*['\"] not found|not found, try pulling")
_CAPABILITY = re.compile(r"does not support")
_RUNNER = re.compile(r"runner has unexpectedly stopped|timed out waiting for llama|llama runner")
_BUSY = re.compile(r"server busy|maximum pending requests")
_TIMEOUT_SETTINGS = {"first_byte": "CORRAL_FIRST_BYTE_TIMEOUT_S", "stall": "CORRAL_STALL_TIMEOUT_S"}


@contextlib.contextmanager
def ollama_errors() -> Iterator[None]:
    """Run a call to the Ollama client; its errors leave as :class:`CorralError` types."""
    try:
        yield
    except OllamaError as exc:
        raise corral_error(exc) from exc


def translated(stream: Iterator[T]) -> Iterator[T]:
    """Iterate a stream of the client; its errors leave through :func:`ollama_errors`."""
    with ollama_errors():
        yield from stream


def corral_error(exc: OllamaError) -> CorralError:
    """The corral error for what the client reported."""
    model = exc.model
    if isinstance(exc, OllamaStopped):
        return TaskCancelled("cancelled while calling Ollama", model=model)
    if isinstance(exc, OllamaResponseError):
        if exc.mid_stream:  # no HTTP status to speak of: the 200 was sent long ago
            return OllamaRunnerError(
                f"Ollama failed mid-stream: {exc.body}", model=model, body=exc.body
            )
        return classify_error(exc.status, exc.body or "", model)
    if isinstance(exc, OllamaTimeout):
        if exc.phase == "connect":
            return OllamaUnavailable(
                f"{exc.message}; check that OLLAMA_HOST is up and reachable", model=model
            )
        setting = _TIMEOUT_SETTINGS[exc.phase]
        return TaskTimeout(f"{exc.message}; raise {setting} if the model is slow", model=model)
    if isinstance(exc, OllamaTLSError):
        return OllamaRequestError(
            f"{exc.message}; check CORRAL_TLS_CA_BUNDLE or the host's certificate", model=model
        )
    if isinstance(exc, OllamaStreamError):
        return OllamaRunnerError(exc.message, model=model)
    # OllamaConnectError: refused, unknown host, lost before any answer.
    return OllamaUnavailable(f"{exc.message}; check that OLLAMA_HOST is up", model=model)


def classify_error(status: int, message: str, model: str | None) -> CorralError:
    """Map an error answer of Ollama (status 200: an error line before any chunk, as servers
    before v0.12.6 send) to the error tree."""
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
