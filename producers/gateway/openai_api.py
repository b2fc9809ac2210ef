"""The OpenAI-compatible routes: chat and text completions become corral tasks; models are listed.

``/v1/chat/completions`` maps to a ``chat`` task (a ``structured`` one for a ``json_schema``
response format, a ``multimodal`` one when a message carries an image) and ``/v1/completions``
to a ``generate`` task, through :meth:`Gateway.submit` like every other route. The reply is
relayed from the task's event stream in OpenAI's shapes. As in the Ollama facade, a streamed
reply's headers wait for the first token, so that an error before it keeps its status, and a
client that goes away cancels its task. Errors use OpenAI's ``{"error": {...}}`` shape with the
status codes the ``openai`` SDKs map to their exception classes; every reply carries
``x-request-id`` (the task id when there is a task).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from producers.gateway.auth import ApiKey
from producers.gateway.deps import Key, gateway_of
from producers.gateway.errors import native_status
from producers.gateway.limits import Refusal
from producers.gateway.openai_models import ChatMessage, ChatRequest, CompletionRequest
from producers.gateway.relay import follow
from producers.gateway.service import Gateway, Submitted
from producers.gateway.sse import (
    SSE,
    SSE_HEADERS,
    DisconnectAwareStream,
    Disconnected,
    until_disconnect,
)
from tasks.errors import CorralError, InvalidRequest, ModelNotFound, TaskCancelled, error_from_dict
from tasks.events import TERMINAL_TYPES
from tasks.keys import QUEUE_PREFIX, canonical_model, model_of_queue, queue_name, task_key
from tasks.results import parse_result

REQUEST_ID = "x-request-id"
USER_FIELD = "openai_user"  # in the task record: the ``user`` the client named
DONE_LINE = b"data: [DONE]\n\n"
_END: Any = object()
Events = AsyncGenerator[dict[str, Any] | None, None]

# The ``type`` OpenAI gives each status; the SDKs pick their exception class by status alone.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
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


# -- errors, and the request id every reply carries ------------------------------------------
def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = _ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_of(exc: CorralError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A typed error (refused at the door or raised by the task) in OpenAI's shape."""
    status = 404 if isinstance(exc, ModelNotFound) else native_status(exc)
    param = _param(exc.field) if isinstance(exc, InvalidRequest) else None
    return openai_error(
        status, exc.message, param=param, code=_snake(type(exc).__name__), headers=headers
    )


def invalid_body(exc: ValidationError) -> JSONResponse:
    problems, first = [], None
    for error in exc.errors(include_url=False):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        where = where.lstrip(".") or "body"
        first = first or where
        problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
    return openai_error(
        400,
        "invalid request: " + "; ".join(problems) + "; fix it and send the request again",
        param=first,
        code="invalid_request",
    )


def _param(field: str | None) -> str | None:
    if not field:
        return None
    parts = field.split(".")
    if parts[0] == "options" and len(parts) > 1:
        return _PARAMS.get(parts[1], parts[1])
    return re.sub(r"\.(\d+)", r"[\1]", _PARAMS.get(parts[0], parts[0]) + field[len(parts[0]) :])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


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
                    exc.status, exc.message, code=_snake(exc.kind), headers=exc.headers
                )
            except CorralError as exc:
                response = error_of(exc)
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

    @router.get("/models", summary="The models live workers serve, in OpenAI's list shape")
    async def models(request: Request, key: Key) -> Response:
        served = await _served_models(gateway_of(request), key)
        return JSONResponse(
            {"object": "list", "data": [_model_card(m, t) for m, t in served.items()]}
        )

    @router.get("/models/{model_id:path}", summary="One served model, in OpenAI's shape")
    async def model(request: Request, key: Key, model_id: str) -> Response:
        served = await _served_models(gateway_of(request), key)
        try:
            name = canonical_model(model_id)
        except InvalidRequest:
            name = ""
        if name not in served:
            raise _unknown_model(model_id)
        return JSONResponse(_model_card(name, served[name]))

    return router


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise InvalidRequest(
            f"the request body is not JSON ({exc}); send a JSON object", field="body"
        ) from exc


def _unknown_model(model: str) -> Refusal:
    return Refusal(
        404,
        "ModelNotFound",
        f"the model '{model}' does not exist or no worker "
        "serves it; GET /v1/models lists the served models",
    )


async def _served_models(gw: Gateway, key: ApiKey | None) -> dict[str, int]:
    """Each model a live worker serves (and ``key`` may use) → when its first worker started."""
    served: dict[str, int] = {}
    for worker in await gw.workers():
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
    if not any(queue_name(name) in w.queues for w in await gw.workers()):
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
    effort = body.reasoning_effort
    think = (
        None
        if effort is None
        else (False if effort == "none" else {"minimal": "low"}.get(effort, effort))
    )
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


# -- replies ---------------------------------------------------------------------------------
def _usage(result: dict[str, Any]) -> dict[str, int]:
    metrics = result.get("metrics") or {}
    prompt, completion = metrics.get("prompt_eval_count") or 0, metrics.get("eval_count") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _text(result: dict[str, Any]) -> tuple[str, str]:
    """The reply's text and thinking, whatever the kind."""
    typed = parse_result(result)
    text = getattr(typed, "text", None)
    if text is None:
        text = getattr(typed, "raw_text", "")
    message = result.get("message") or {}
    return str(text), message.get("thinking") or result.get("thinking") or ""


class Shaper:
    """Builds one request's OpenAI objects; the subclasses know chat and text completions."""

    object_whole = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, submitted: Submitted, model: str, include_usage: bool) -> None:
        self.id = self.id_prefix + submitted.job.id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        # A structured reply may be corrected once: stream it only once it is validated.
        self.whole_only = submitted.kind == "structured"

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def finish_reason(self, result: dict[str, Any]) -> str:
        return "length" if result.get("done_reason") == "length" else "stop"

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def opening(self) -> list[dict[str, Any]]:
        return []

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        raise NotImplementedError

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        """The last chunks: what was not streamed yet, the finish reason, the usage."""
        raise NotImplementedError

    def usage_chunk(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self.head(self.object_chunk), "choices": [], "usage": _usage(result)}]


class ChatShaper(Shaper):
    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl-"

    def tool_calls(self, result: dict[str, Any], indexed: bool) -> list[dict[str, Any]]:
        calls = (result.get("message") or {}).get("tool_calls") or []
        out = []
        for index, call in enumerate(calls):
            function = call.get("function") or {}
            arguments = function.get("arguments")
            out.append(
                {
                    **({"index": index} if indexed else {}),
                    "id": call.get("id") or f"call_{self.id[-12:]}_{index}",
                    "type": "function",
                    "function": {
                        "name": function.get("name", ""),
                        "arguments": arguments
                        if isinstance(arguments, str)
                        else json.dumps(arguments or {}),
                    },
                }
            )
        return out

    def finish_reason(self, result: dict[str, Any]) -> str:
        if (result.get("message") or {}).get("tool_calls"):
            return "tool_calls"
        return super().finish_reason(result)

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        text, thinking = _text(result)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if thinking:
            message["reasoning_content"] = thinking
        if calls := self.tool_calls(result, indexed=False):
            message["tool_calls"] = calls
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": self.finish_reason(result),
        }
        return {**self.head(self.object_whole), "choices": [choice], "usage": _usage(result)}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self.head(self.object_chunk), "choices": [choice]}

    def opening(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        return self._chunk({"reasoning_content": thinking} if thinking else {"content": text})

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        chunks = []
        if not streamed:
            text, thinking = _text(result)
            if thinking:
                chunks.append(self._chunk({"reasoning_content": thinking}))
            if text:
                chunks.append(self._chunk({"content": text}))
        if calls := self.tool_calls(result, indexed=True):
            chunks.append(self._chunk({"tool_calls": calls}))
        chunks.append(self._chunk({}, self.finish_reason(result)))
        return [*chunks, *self.usage_chunk(result)]


class CompletionShaper(Shaper):
    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def whole(self, result: dict[str, Any]) -> dict[str, Any]:
        choice = self._choice(_text(result)[0], self.finish_reason(result))
        return {**self.head(self.object_whole), "choices": [choice], "usage": _usage(result)}

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any] | None:
        if not text:
            return None  # the legacy shape has no place for thinking
        return {**self.head(self.object_chunk), "choices": [self._choice(text, None)]}

    def closing(self, result: dict[str, Any], streamed: bool) -> list[dict[str, Any]]:
        text = "" if streamed else _text(result)[0]
        last = {
            **self.head(self.object_chunk),
            "choices": [self._choice(text, self.finish_reason(result))],
        }
        return [last, *self.usage_chunk(result)]


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def reply(
    request: Request, gw: Gateway, submitted: Submitted, shaper: Shaper, *, stream: bool
) -> Response:
    job = submitted.job
    headers = {**submitted.headers, REQUEST_ID: job.id}
    events = follow(gw.redis, job.id, on_idle=lambda: gw.outcome(job))
    wanted = (
        TERMINAL_TYPES
        if not stream or shaper.whole_only
        else ("token", "thinking", *TERMINAL_TYPES)
    )
    try:
        first = await until_disconnect(request, _next_of(events, wanted))
    except Disconnected:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await _cancel(submitted)
        return Response(status_code=499, headers=headers)
    if first["type"] in TERMINAL_TYPES and first["type"] != "done":
        await events.aclose()
        return error_of(_error_of(first), headers)
    if not stream:
        await events.aclose()
        gw.observe(parse_result(first["result"]))
        return JSONResponse(shaper.whole(first["result"]), headers=headers)
    body = _chunks(gw, submitted, shaper, first, events)
    return DisconnectAwareStream(body, media_type=SSE, headers={**SSE_HEADERS, **headers})


async def _next_of(events: Events, types: tuple[str, ...]) -> dict[str, Any]:
    async for event in events:
        if event is not None and event["type"] in types:
            return event
    raise CorralError(
        "the task's event stream ended without a terminal event; see the task's "
        "status with GET /v1/tasks/{id}"
    )


def _error_of(terminal: dict[str, Any]) -> CorralError:
    if terminal["type"] == "cancelled":
        return TaskCancelled(str(terminal.get("reason") or "the task was cancelled"))
    return error_from_dict(terminal.get("error") or {})


def _stream_error(error: CorralError) -> bytes:
    status = 404 if isinstance(error, ModelNotFound) else native_status(error)
    kind = _ERROR_TYPES.get(status, "server_error")
    return sse(
        {
            "error": {
                "message": error.message,
                "type": kind,
                "param": None,
                "code": _snake(type(error).__name__),
            }
        }
    )


async def _chunks(
    gw: Gateway, submitted: Submitted, shaper: Shaper, first: dict[str, Any], events: Events
) -> AsyncIterator[bytes]:
    finished, streamed = False, False
    try:
        for opening in shaper.opening():
            yield sse(opening)
        event: dict[str, Any] | None = first
        while True:
            if event is not None:
                kind = event["type"]
                if kind in ("token", "thinking"):
                    text = event["text"]
                    delta = shaper.delta(
                        **({"text": text} if kind == "token" else {"thinking": text})
                    )
                    if delta is not None:
                        streamed = streamed or kind == "token"
                        yield sse(delta)
                elif kind == "restart" and streamed:
                    # Sent text cannot be taken back: end the stream with an error, as Ollama does.
                    yield _stream_error(
                        CorralError(
                            "the model failed mid-stream and the task "
                            "started over; send the request again"
                        )
                    )
                    return
                elif kind == "done":
                    finished = True
                    gw.observe(parse_result(event["result"]))
                    for chunk in shaper.closing(event["result"], streamed):
                        yield sse(chunk)
                    yield DONE_LINE
                    return
                elif kind in TERMINAL_TYPES:
                    finished = True
                    yield _stream_error(_error_of(event))
                    return
            event = await anext(events, _END)
            if event is _END:
                return
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        if not finished:
            await _cancel(submitted)


async def _cancel(submitted: Submitted) -> None:
    """Cancel the task of a client that went away (shielded: we are often being cancelled)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(CorralError):
        await run_in_threadpool(submitted.job.cancel)


__all__ = ["OpenAIRoute", "build_router", "chat_task", "openai_error"]
