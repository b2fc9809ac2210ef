"""Typed errors as HTTP statuses and OpenAI's ``{"error": {...}}`` bodies.

The gateway answers with them, and a batch writes them into its error file.
"""

from __future__ import annotations

import re
from typing import Any

from tasks.errors import (
    BrokerUnavailable,
    CapabilityError,
    CorralError,
    InvalidRequest,
    ModelNotFound,
    OllamaOverloaded,
    OllamaUnavailable,
    QueueFull,
    StructuredOutputError,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
)

_HTTP_STATUS: tuple[tuple[type[CorralError], int], ...] = (
    (InvalidRequest, 400),
    (CapabilityError, 400),
    (ModelNotFound, 404),
    (TaskNotFound, 404),
    (TaskCancelled, 409),
    (QueueFull, 429),
    (StructuredOutputError, 422),
    (OllamaUnavailable, 502),
    (BrokerUnavailable, 503),
    (OllamaOverloaded, 503),
    (TaskTimeout, 504),
)


def http_status(error: CorralError) -> int:
    """The HTTP status that answers a typed error."""
    for cls, status in _HTTP_STATUS:
        if isinstance(error, cls):
            return status
    return 500


# The ``type`` OpenAI gives each status; the SDKs pick their exception class by status alone.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
# A task payload's field, as the OpenAI request names it (``param`` of a 400).
_PARAMS = {
    "num_predict": "max_tokens",
    "format": "response_format",
    "schema": "response_format",
    "think": "reasoning_effort",
    "images": "messages",
}


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def described(exc: CorralError) -> tuple[int, dict[str, Any]]:
    status = 404 if isinstance(exc, ModelNotFound) else http_status(exc)
    param = _param(exc.field) if isinstance(exc, InvalidRequest) else None
    return status, error_body(status, exc.message, param=param, code=snake_case(type(exc).__name__))


def _param(field: str | None) -> str | None:
    if not field:
        return None
    parts = field.split(".")
    if parts[0] == "options" and len(parts) > 1:
        return _PARAMS.get(parts[1], parts[1])
    return re.sub(r"\.(\d+)", r"[\1]", _PARAMS.get(parts[0], parts[0]) + field[len(parts[0]) :])


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
