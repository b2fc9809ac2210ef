"""The facade's embedding routes: ``/api/embed`` and the legacy ``/api/embeddings`` become
``embed`` tasks, queued and gathered like any other, answered in the shape of Ollama's route.

As Ollama does, a model no live worker serves is a 404 at once, a request without input only
loads the model (it is proxied), generation options are ignored rather than refused (clients
such as LangChain send them), and the model is echoed as it was sent. A client that goes away
cancels its task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from producers.gateway.auth import ApiKey
from producers.gateway.deps import Key, gateway_of
from producers.gateway.errors import ollama_message, ollama_status
from producers.gateway.facade import (
    GoType,
    cancel_task,
    check_go_types,
    check_model,
    error_of,
    not_served,
    ollama_error,
    read_body,
    terminal_of,
)
from producers.gateway.relay import follow
from producers.gateway.service import Gateway, Submitted
from producers.gateway.sse import Disconnected, until_disconnect
from producers.gateway.upstream import forward, hosts_for
from tasks.kinds.embed import RUNNER_OPTIONS

_STRING: GoType = ("string", "string", None)
_OPTIONS: GoType = ("map[string]interface {}", "object", None)
EMBED_TYPES: dict[str, GoType] = {
    "model": _STRING,
    "truncate": ("bool", "bool", None),
    "dimensions": ("int", "number", None),
    "options": _OPTIONS,
}
EMBEDDINGS_TYPES: dict[str, GoType] = {"model": _STRING, "prompt": _STRING, "options": _OPTIONS}
# Ollama's figures on an /api/embed reply; Go omits a zero one.
REPLY_METRICS = ("total_duration", "load_duration", "prompt_eval_count")


def add_routes(router: APIRouter) -> None:
    """Add ``POST /embed`` and ``POST /embeddings`` to the facade's ``/api`` router."""

    @router.post("/embed")
    async def embed(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        body = await read_body(request)
        check_go_types(body, "EmbedRequest", EMBED_TYPES)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return ollama_error(404, f"model '{model or ''}' not found")
        check_model(key, model)
        if (unserved := await not_served(gw, model)) is not None:
            return unserved
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs] if inputs else []
        elif inputs is None:
            inputs = []
        elif not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return ollama_error(400, "invalid input type")
        if not inputs:  # Ollama's "load the model" call
            hosts = hosts_for(await gw.workers(), model)
            return await forward(gw.http, hosts, "POST", "/api/embed", body)
        data = {
            "model": model,
            "input": inputs,
            "truncate": body.get("truncate"),
            "dimensions": body.get("dimensions") or None,
            "options": runner_options(body.get("options")),
            "keep_alive": body.get("keep_alive"),
        }

        def shape(result: dict[str, Any]) -> dict[str, Any]:
            metrics = result.get("metrics") or {}
            out = {"model": model, "embeddings": result["embeddings"]}
            return out | {k: metrics[k] for k in REPLY_METRICS if metrics.get(k)}

        return await queued_reply(request, gw, key, data, model, shape)

    @router.post("/embeddings")
    async def embeddings(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        body = await read_body(request)
        check_go_types(body, "EmbeddingRequest", EMBEDDINGS_TYPES)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return ollama_error(400, "model is required")
        check_model(key, model)
        if (unserved := await not_served(gw, model)) is not None:
            return unserved
        prompt = body.get("prompt")
        if not prompt:  # an empty request loads the model
            hosts = hosts_for(await gw.workers(), model)
            return await forward(gw.http, hosts, "POST", "/api/embeddings", body)
        data = {
            "model": model,
            "input": [prompt],
            "options": runner_options(body.get("options")),
            "keep_alive": body.get("keep_alive"),
        }

        def shape(result: dict[str, Any]) -> dict[str, Any]:
            return {"embedding": result["embeddings"][0]}

        return await queued_reply(request, gw, key, data, model, shape)


def runner_options(options: Any) -> Any:
    """Ollama ignores the options an embedding model has no use for; so does the facade (the SDK
    and ``/v1`` refuse them)."""
    if isinstance(options, dict):
        kept = {k: v for k, v in options.items() if k in RUNNER_OPTIONS and v is not None}
        return kept or None
    return options


async def queued_reply(
    request: Request,
    gw: Gateway,
    key: ApiKey | None,
    data: dict[str, Any],
    model: str,
    shape: Callable[[dict[str, Any]], dict[str, Any]],
) -> Response:
    """Submit an ``embed`` task, wait for its end, and answer ``shape(result)`` or the error in
    Ollama's form; a client that disconnects first cancels the task."""
    submitted: Submitted = await gw.submit("embed", data, key)
    job = submitted.job
    events = follow(gw.redis, job.id, on_idle=lambda: gw.outcome(job))
    try:
        terminal = await until_disconnect(request, terminal_of(events))
    except Disconnected:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await cancel_task(gw, submitted)
        return Response(status_code=499)
    await events.aclose()
    if terminal["type"] == "done":
        return JSONResponse(shape(terminal["result"]), headers=submitted.headers)
    error = error_of(terminal)
    return ollama_error(ollama_status(error), ollama_message(error, model), submitted.headers)
