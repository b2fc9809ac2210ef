"""How refusals and typed errors become HTTP answers, in the native and in Ollama's shape.

Native (``/v1``): ``{"error": {"type", "message", "retryable", ...}}``, the typed error's own
dict. Ollama (``/api``): ``{"error": "<text>"}`` with the status Ollama would have answered.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from producers.gateway.limits import Refusal
from tasks.errors import (
    BrokerUnavailable,
    CapabilityError,
    CorralError,
    InvalidRequest,
    ModelNotFound,
    OllamaOverloaded,
    OllamaUnavailable,
    QueueFull,
    TaskCancelled,
)
from tasks.openai.errors import http_status as native_status


def ollama_status(error: CorralError) -> int:
    """Ollama's own status when the worker recorded one; else the nearest Ollama answer."""
    if isinstance(error.status, int) and 400 <= error.status <= 599:
        return error.status
    if isinstance(error, (InvalidRequest, CapabilityError)):
        return 400
    if isinstance(error, ModelNotFound):
        return 404
    if isinstance(error, QueueFull):
        return 429
    if isinstance(error, (OllamaOverloaded, BrokerUnavailable)):
        return 503
    if isinstance(error, OllamaUnavailable):
        return 502
    return 500


def ollama_message(error: CorralError, model_as_sent: str | None = None) -> str:
    if isinstance(error, ModelNotFound) and model_as_sent is not None:
        return f"model '{model_as_sent}' not found"  # Ollama echoes the name as it was sent
    if isinstance(error, TaskCancelled):
        return "request canceled"
    return error.body or error.message


def is_facade(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def refusal_response(request: Request, refusal: Refusal) -> JSONResponse:
    body: dict[str, Any] = (
        {"error": refusal.message}
        if is_facade(request)
        else {
            "error": {
                "type": refusal.kind,
                "message": refusal.message,
                "retryable": refusal.status in (429, 503),
            }
        }
    )
    return JSONResponse(body, status_code=refusal.status, headers=refusal.headers)


def error_headers(error: CorralError) -> dict[str, str]:
    """``Retry-After`` (whole seconds) for a queue at its bound."""
    if isinstance(error, QueueFull) and error.retry_after_s is not None:
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    return {}


def error_response(request: Request, error: CorralError) -> JSONResponse:
    headers = error_headers(error)
    if is_facade(request):
        return JSONResponse(
            {"error": ollama_message(error)}, status_code=ollama_status(error), headers=headers
        )
    return JSONResponse(
        {"error": error.to_dict()}, status_code=native_status(error), headers=headers
    )
