"""The OpenAI-compatible routes: completions and embeddings become corral tasks; models are listed.

``/v1/chat/completions`` maps to a ``chat`` task (a ``structured`` one for a ``json_schema``
response format, a ``multimodal`` one when a message carries an image), ``/v1/completions``
to a ``generate`` task and ``/v1/embeddings`` to an ``embed`` task, through
:meth:`Gateway.submit` like every other route; the reply is relayed in OpenAI's shapes
(openai_replies.py). Every reply carries ``x-request-id``: the task
id when there is a task.
"""

from __future__ import annotations

import json
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
from producers.gateway.openai_models import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from producers.gateway.openai_replies import (
    REQUEST_ID,
    ChatShaper,
    CompletionShaper,
    EmbeddingShaper,
    error_of,
    invalid_body,
    openai_error,
    reply,
    snake_case,
)
from producers.gateway.service import Gateway, Submitted
from producers.gateway.upstream import serves
from tasks.errors import CorralError, InvalidRequest
from tasks.keys import QUEUE_PREFIX, canonical_model, model_of_queue, task_key
from tasks.registry import WorkerInfo
from tasks.untrusted import parse_json

USER_FIELD = "openai_user"  # in the task record: the ``user`` the client named
# ``reasoning_effort`` as Ollama's ``think`` (which has no "minimal")
_THINK: dict[str, bool | str] = {
    "none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
}  # fmt: skip


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
            body = ChatRequest.model_validate(await _json(request))
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
            body = CompletionRequest.model_validate(await _json(request))
        except ValidationError as exc:
            return invalid_body(exc)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest(
                    "prompt: send one prompt per request (a task has one reply)", field="prompt"
                )
            prompt = prompt[0]
        await _require_served(gw, key, body.model)
        data = {"model": body.model, "prompt": prompt, "options": body.options()}
        submitted = await _submit(gw, "generate", data, key, body.user)
        shaper = CompletionShaper(submitted, body.model, body.include_usage)
        return await reply(request, gw, submitted, shaper, stream=body.stream)

    @router.post("/embeddings", summary="OpenAI embeddings, queued as an embed task")
    async def embeddings(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        try:
            body = EmbeddingRequest.model_validate(await _json(request))
        except ValidationError as exc:
            return invalid_body(exc)
        await _require_served(gw, key, body.model)
        data = {"model": body.model, "input": body.input, "dimensions": body.dimensions}
        submitted = await _submit(gw, "embed", data, key, body.user)
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


async def _json(request: Request) -> Any:
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
    submitted = await gw.submit(kind, data, key)
    if user:
        # Recorded beside the task for now; the scheduler's tenants will read it.
        await gw.redis.hset(task_key(submitted.job.id), USER_FIELD, user)
    return submitted


# -- an OpenAI chat request as a task --------------------------------------------------------
def chat_task(body: ChatRequest) -> tuple[str, dict[str, Any]]:
    """The task kind and payload for a chat request (refusing what no kind can carry)."""
    messages = _messages(body.messages)
    has_images = any(m.get("images") for m in messages)
    tools = _tools(body)
    fmt = body.response_format.type if body.response_format else "text"
    think = None if body.reasoning_effort is None else _THINK[body.reasoning_effort]
    options = body.options(body.max_completion_tokens)
    base = {"model": body.model, "messages": messages, "options": options}
    if fmt == "json_schema":
        if tools:
            raise InvalidRequest(
                "tools cannot be combined with a json_schema response format; "
                "send one or the other",
                field="tools",
            )
        if has_images:
            raise InvalidRequest(
                "images cannot be combined with a json_schema response format "
                "here; describe the image first",
                field="response_format",
            )
        schema = body.response_format.json_schema if body.response_format else None
        if schema is None:  # ResponseFormat refuses this already; mypy cannot know
            raise InvalidRequest(
                "response_format: give json_schema.schema", field="response_format"
            )
        return "structured", {
            **base,
            "schema": schema.schema_,
            "think": None if think is None else bool(think),
        }
    if has_images:
        for name, given in (
            ("tools", tools),
            ("response_format", fmt != "text"),
            ("reasoning_effort", think is not None),
        ):
            if given:
                raise InvalidRequest(
                    f"{name} cannot be combined with images here; send the request without {name}",
                    field=name,
                )
        return "multimodal", base
    return "chat", {
        **base,
        "tools": tools,
        "think": think,
        "format": "json" if fmt == "json_object" else None,
    }


def _tools(body: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools to pass to Ollama after ``tool_choice`` (which Ollama has no field for)."""
    choice, tools = body.tool_choice, body.tools or []
    if choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
        if not tools:
            raise InvalidRequest(
                f"tool_choice names the function {wanted!r}, which is not in "
                "tools; name one of the tools sent",
                field="tool_choice",
            )
    return tools or None


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama's: parts joined, images inline, tool calls with dict args."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name, for the tool messages after it
    for i, message in enumerate(messages):
        text, images = _content(message, i)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": text,
        }
        if images:
            item["images"] = images
        if message.tool_calls:
            item["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except ValueError as exc:
                    where = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise InvalidRequest(
                        f"{where}: not JSON ({exc}); send the arguments as a JSON object in text",
                        field=where,
                    ) from exc
                if call.id:
                    names[call.id] = call.function.name
                item["tool_calls"].append(
                    {"function": {"name": call.function.name, "arguments": arguments}}
                )
        if message.role == "tool" and (name := names.get(message.tool_call_id or "")):
            item["tool_name"] = name
        out.append(item)
    return out


def _content(message: ChatMessage, index: int) -> tuple[str, list[str]]:
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    texts, images = [], []
    for j, part in enumerate(message.content):
        if part.type == "text":
            texts.append(part.text)
            continue
        url = part.image_url.url
        if not url.startswith("data:"):
            where = f"messages[{index}].content[{j}].image_url.url"
            raise InvalidRequest(
                f"{where}: this gateway does not fetch images from URLs; send "
                "the image inline as a data URI (data:image/png;base64,...)",
                field=where,
            )
        images.append(url)  # the gateway decodes and checks it (Gateway.submit)
    return "\n".join(texts), images


__all__ = ["OpenAIRoute", "build_router", "chat_task"]
