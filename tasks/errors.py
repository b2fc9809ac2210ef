"""The one exception tree of ollama-corral, shared by workers and producers.

::

    CorralError
    ├── PermanentError                 never retried: the same request fails the same way
    │   ├── InvalidRequest             refused payload (producer or worker side)
    │   │   └── InvalidSetting         a setting's value is malformed or does not fit its server
    │   ├── ModelNotFound              Ollama answered 404 for the model
    │   ├── CapabilityError            the model lacks vision / tools / thinking ...
    │   ├── StructuredOutputError      the reply did not match the schema (carries raw text)
    │   ├── TaskCancelled              cancelled by a caller
    │   ├── TaskNotFound               no such task was ever submitted (or it expired)
    │   └── OllamaRequestError         any other 4xx/5xx that retrying will not fix
    └── RetryableError                 worth another attempt after a backoff
        ├── OllamaUnavailable          connection refused / reset, 502, 504
        ├── OllamaOverloaded           503 "server busy"
        ├── OllamaRunnerError          500 runner crash, error line mid-stream, stream cut short
        ├── TaskTimeout                the stall timeout or the task deadline passed
        ├── BrokerUnavailable          Redis could not be reached
        └── QueueFull                  the model's queue is at its depth bound (retry_after_s)

Every error carries its context in ``info`` (model, task id, attempts, Ollama status and body),
and ``args == (message, info)`` so that Celery's JSON result backend rebuilds the very same type
with the same attributes: ``job.result()`` re-raises what the worker raised.
"""

from __future__ import annotations

from typing import Any

BODY_LIMIT = 2000  # characters of an Ollama body kept on an error


class CorralError(Exception):
    """Root of every error ollama-corral raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, info: dict[str, Any] | None = None, **context: Any) -> None:
        merged: dict[str, Any] = dict(info or {})
        merged.update({k: v for k, v in context.items() if v is not None})
        body = merged.get("body")
        if isinstance(body, str) and len(body) > BODY_LIMIT:
            merged["body"] = body[:BODY_LIMIT] + "…"
        super().__init__(message, merged)
        self.message = message
        self.info = merged

    def __str__(self) -> str:
        return self.message

    @property
    def status(self) -> int | None:
        """The HTTP status Ollama answered with; None when there was none (a stream that broke
        or failed after its 200, a connection error)."""
        return self.info.get("status")

    @property
    def body(self) -> str | None:
        return self.info.get("body")

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    @property
    def task_id(self) -> str | None:
        return self.info.get("task_id")

    @property
    def attempts(self) -> int:
        return int(self.info.get("attempts", 0))

    def with_info(self, **context: Any) -> CorralError:
        """Return the same error with more context (the traceback and cause are kept)."""
        self.info.update({k: v for k, v in context.items() if v is not None})
        self.args = (self.message, self.info)
        return self

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used in stream ``error`` events and dead-letter records."""
        return {
            "type": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            **self.info,
        }


class PermanentError(CorralError):
    """The same request would fail the same way: do not retry."""


class RetryableError(CorralError):
    """A transient failure: another attempt after a backoff may succeed."""

    retryable = True


class InvalidRequest(PermanentError):
    """The payload breaks a rule; ``field`` names the offending part."""

    @property
    def field(self) -> str | None:
        return self.info.get("field")


class InvalidSetting(InvalidRequest):
    """A setting (``field``: its environment variable) is malformed, or does not fit the server
    it names (a wrong Redis password, a failed TLS handshake). The message says how to fix it."""


class ModelNotFound(PermanentError):
    """Ollama does not have the model (HTTP 404). Pull it, or fix the name."""


class CapabilityError(PermanentError):
    """The model cannot do what was asked (images, tools, thinking)."""


class StructuredOutputError(PermanentError):
    """The model's reply did not validate against the schema, even after a corrective retry."""

    @property
    def raw_text(self) -> str | None:
        return self.info.get("raw_text")


class TaskCancelled(PermanentError):
    """A caller cancelled the task."""


class TaskNotFound(PermanentError):
    """No task with this id was submitted, or its records have expired."""


class OllamaRequestError(PermanentError):
    """Ollama refused the request in a way no retry will fix (other 4xx, bad option types)."""


class OllamaUnavailable(RetryableError):
    """Ollama could not be reached, or a proxy in front of it answered 502/504."""


class OllamaOverloaded(RetryableError):
    """Ollama's pending queue is full (503 server busy)."""


class OllamaRunnerError(RetryableError):
    """The model runner failed: 500 crash, an error line mid-stream, or a stream cut short."""


class TaskTimeout(RetryableError):
    """No chunk arrived within the stall timeout, or the task deadline passed."""


class BrokerUnavailable(RetryableError):
    """Redis could not be reached."""


class QueueFull(RetryableError):
    """The model's queue holds its depth bound of tasks; try again after ``retry_after_s``."""

    @property
    def retry_after_s(self) -> float | None:
        return self.info.get("retry_after_s")


ERROR_TYPES: dict[str, type[CorralError]] = {
    cls.__name__: cls
    for cls in (
        CorralError,
        PermanentError,
        RetryableError,
        InvalidRequest,
        InvalidSetting,
        ModelNotFound,
        CapabilityError,
        StructuredOutputError,
        TaskCancelled,
        TaskNotFound,
        OllamaRequestError,
        OllamaUnavailable,
        OllamaOverloaded,
        OllamaRunnerError,
        TaskTimeout,
        BrokerUnavailable,
        QueueFull,
    )
}


def error_from_dict(data: dict[str, Any]) -> CorralError:
    """Rebuild an error from :meth:`CorralError.to_dict` (stream events, dead letters)."""
    info = {k: v for k, v in data.items() if k not in ("type", "message", "retryable")}
    cls = ERROR_TYPES.get(str(data.get("type")), CorralError)
    return cls(str(data.get("message", "unknown error")), info)
