"""The OpenAI-compatible routes: completions and embeddings become corral tasks; models are listed.

``/v1/chat/completions`` maps to a ``chat`` task (a ``structured`` one for a ``json_schema``
response format, a ``multimodal`` one when a message carries an image), ``/v1/completions``
to a ``generate`` task and ``/v1/embeddings`` to an ``embed`` task, through
:meth:`Gateway.submit` like every other route; the reply is relayed in OpenAI's shapes
(openai_replies.py). Every reply carries ``x-request-id``: the task
id when there is a task.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from producers.gateway.auth import ApiKey
from producers.gateway.deps import Key, gateway_of
from producers.gateway.errors import error_headers
from producers.gateway.limits import Refusal
from producers.gateway.openai_replies import (
    REQUEST_ID,
    ChatShaper,
    CompletionShaper,
    EmbeddingShaper,
    error_of,
    invalid_body,
    openai_error,
    reply,
)
from producers.gateway.service import Gateway, Submitted
from producers.gateway.upstream import serves
from tasks.errors import CorralError, InvalidRequest
from tasks.keys import QUEUE_PREFIX, canonical_model, model_of_queue, task_key
from tasks.openai import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_task,
    completion_task,
    embedding_task,
)
from tasks.openai.errors import snake_case
from tasks.registry import WorkerInfo
from tasks.untrusted import parse_json

USER_FIELD = "openai_user"  # in the task record: the ``user`` the client named, as sent


class OpenAIRoute(APIRoute):
    """Answers every error of these routes in OpenAI's shape, and adds ``x-request-id``.

    Wrapping the route handler also covers the key check, which runs as a dependency.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except Refusal as exc:
                response = openai_error(
                    exc.status, exc.message, code=snake_case(exc.kind), headers=exc.headers
                )
            except CorralError as exc:
                response = error_of(exc, error_headers(exc))  # Retry-After of a QueueFull
            response.headers.setdefault(REQUEST_ID, f"req_{uuid.uuid4().hex}")
            return response

        return route


# -- routes ----------------------------------------------------------------------------------
def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)

    @router.post("/chat/completions", summary="OpenAI chat completion, queued as a task")
    async def chat_completions(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        try:
            body = ChatRequest.model_validate(await json_body(request))
        except ValidationError as exc:
            return invalid_body(exc)
        await _require_served(gw, key, body.model)
        kind, data = chat_task(body)
        submitted = await _submit(gw, kind, data, key, body.user)
        shaper = ChatShaper(submitted, body.model, body.include_usage)
        return await reply(request, gw, submitted, shaper, stream=body.stream)

    @router.post("/completions", summary="OpenAI (legacy) text completion, queued as a task")
    async def completions(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        try:
            body = CompletionRequest.model_validate(await json_body(request))
        except ValidationError as exc:
            return invalid_body(exc)
        kind, data = completion_task(body)
        await _require_served(gw, key, body.model)
        submitted = await _submit(gw, kind, data, key, body.user)
        shaper = CompletionShaper(submitted, body.model, body.include_usage)
        return await reply(request, gw, submitted, shaper, stream=body.stream)

    @router.post("/embeddings", summary="OpenAI embeddings, queued as an embed task")
    async def embeddings(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        try:
            body = EmbeddingRequest.model_validate(await json_body(request))
        except ValidationError as exc:
            return invalid_body(exc)
        await _require_served(gw, key, body.model)
        kind, data = embedding_task(body)
        submitted = await _submit(gw, kind, data, key, body.user)
        shaper = EmbeddingShaper(submitted, body.model, body.encoding_format)
        return await reply(request, gw, submitted, shaper, stream=False)

    @router.get("/models", summary="The models live workers serve, in OpenAI's list shape")
    async def models(request: Request, key: Key) -> Response:
        served = _served_models(await gateway_of(request).recent_workers(), key)
        return JSONResponse(
            {"object": "list", "data": [_model_card(m, t) for m, t in served.items()]}
        )

    @router.get("/models/{model_id:path}", summary="One served model, in OpenAI's shape")
    async def model(request: Request, key: Key, model_id: str) -> Response:
        served = _served_models(await gateway_of(request).recent_workers(), key)
        try:
            name = canonical_model(model_id)
        except InvalidRequest:
            name = ""
        if name not in served:
            raise _unknown_model(model_id)
        return JSONResponse(_model_card(name, served[name]))

    return router


async def json_body(request: Request) -> Any:
    """The body, parsed as untrusted JSON (too deep a nesting is refused, never a 500)."""
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object", field="body")
    limit = gateway_of(request).settings.max_json_depth
    return parse_json(raw, what="the request body", max_depth=limit, field="body")


def _unknown_model(model: str) -> Refusal:
    return Refusal(
        404,
        "ModelNotFound",
        f"the model '{model}' does not exist or no worker serves it; "
        "GET /v1/models lists the served models",
    )


def _served_models(workers: list[WorkerInfo], key: ApiKey | None) -> dict[str, int]:
    """Each model a live worker serves (and ``key`` may use) → when its first worker started."""
    served: dict[str, int] = {}
    for worker in workers:
        for queue in worker.queues:
            name = model_of_queue(queue)
            if queue.startswith(QUEUE_PREFIX) and (key is None or key.allows(name)):
                served[name] = min(served.get(name, int(worker.started_at)), int(worker.started_at))
    return dict(sorted(served.items()))


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ollama-corral"}


async def _require_served(gw: Gateway, key: ApiKey | None, model: str) -> None:
    """An invalid name is a 400, a forbidden model a 403, an unserved one a 404: all at once,
    rather than a task that would wait in a queue nobody reads."""
    name = canonical_model(model)
    if key is not None and not key.allows(name):
        raise Refusal(
            403,
            "ModelNotAllowed",
            f"this key may not use model '{model}'; ask for a key that allows it",
        )
    if not serves(await gw.recent_workers(), name):
        raise _unknown_model(model)


async def _submit(
    gw: Gateway, kind: str, data: dict[str, Any], key: ApiKey | None, user: str | None
) -> Submitted:
    submitted = await gw.submit(kind, data, key, user=user)
    if user:
        await gw.redis.hset(task_key(submitted.job.id), USER_FIELD, user)
    return submitted


__all__ = ["OpenAIRoute", "build_router"]
