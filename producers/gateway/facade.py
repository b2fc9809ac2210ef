"""The Ollama-compatible facade: ``/api/generate`` and ``/api/chat`` become corral tasks
(``/api/embed`` and ``/api/embeddings`` too: ``facade_embed.py``).

The reply has Ollama's exact shape, relayed from the task's event stream. As Ollama does, the
headers wait for the first token, so an error before it keeps Ollama's status and body. A
client that goes away cancels its task. Routes without a task kind are proxied (upstream.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from producers.gateway.auth import ApiKey
from producers.gateway.deps import Key, gateway_of
from producers.gateway.errors import ollama_message, ollama_status
from producers.gateway.limits import Refusal
from producers.gateway.relay import follow
from producers.gateway.service import Gateway, Submitted
from producers.gateway.sse import DisconnectAwareStream, Disconnected, until_disconnect
from producers.gateway.upstream import forward, gather_models, hosts_for, serves
from tasks.errors import (
    CorralError,
    InvalidRequest,
    ModelNotFound,
    TaskCancelled,
    error_from_dict,
)
from tasks.events import TERMINAL_TYPES
from tasks.keys import queue_name
from tasks.payloads import Message, Options
from tasks.results import METRIC_FIELDS, parse_result
from tasks.untrusted import parse_json, replace_lone_surrogates

NDJSON = "application/x-ndjson"
_END: Any = object()
UNSUPPORTED = ("suffix", "template", "logprobs", "top_logprobs")
MESSAGE_FIELDS = set(Message.model_fields)
OPTION_FIELDS = set(Options.model_fields)


def created_at() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_router() -> APIRouter:
    router = APIRouter(prefix="/api", tags=["ollama"], include_in_schema=False)

    @router.post("/generate")
    async def generate(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        body = await read_body(request)
        check_go_types(body, "GenerateRequest", GENERATE_TYPES)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return ollama_error(404, f"model '{model or ''}' not found")
        check_model(key, model)
        if (unserved := await not_served(gw, model)) is not None:
            return unserved
        if bad := [f for f in UNSUPPORTED if body.get(f)]:
            return ollama_error(400, f"{', '.join(bad)} is not supported by this gateway")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return await forward(
                gw.http, hosts_for(await gw.workers(), model), "POST", "/api/generate", body
            )  # load / unload
        common = {
            "model": model,
            "prompt": prompt,
            "system": body.get("system"),
            "options": clean_options(body.get("options")),
            "keep_alive": body.get("keep_alive"),
        }
        if body.get("images"):
            if body.get("context"):
                return ollama_error(400, "context with images is not supported by this gateway")
            kind, data = "multimodal", {**common, "images": body["images"]}
        else:
            kind, data = (
                "generate",
                {
                    **common,
                    "format": body.get("format") or None,
                    "raw": body.get("raw") or None,
                    "think": body.get("think"),
                    "context": body.get("context") or None,
                },
            )
        submitted = await submit(request, gw, kind, data, key, model)
        return await reply(
            request, gw, submitted, model, body.get("stream", True) is not False, chat=False
        )

    @router.post("/chat")
    async def chat(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        body = await read_body(request)
        check_go_types(body, "ChatRequest", CHAT_TYPES)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return ollama_error(400, "model is required")
        check_model(key, model)
        if (unserved := await not_served(gw, model)) is not None:
            return unserved
        if bad := [f for f in UNSUPPORTED if body.get(f)]:
            return ollama_error(400, f"{', '.join(bad)} is not supported by this gateway")
        messages = body.get("messages")
        if not messages:
            return await forward(
                gw.http, hosts_for(await gw.workers(), model), "POST", "/api/chat", body
            )  # load / unload
        if not isinstance(messages, list):
            return ollama_error(400, "messages must be an array")
        data = {
            "model": model,
            "messages": [clean_message(m) for m in messages],
            "tools": body.get("tools") or None,
            "think": body.get("think"),
            "format": body.get("format") or None,
            "options": clean_options(body.get("options")),
            "keep_alive": body.get("keep_alive"),
        }
        submitted = await submit(request, gw, "chat", data, key, model)
        return await reply(
            request, gw, submitted, model, body.get("stream", True) is not False, chat=True
        )

    from producers.gateway import facade_embed  # it builds on this module's helpers

    facade_embed.add_routes(router)  # /api/embed and /api/embeddings: embed tasks

    @router.post("/show")
    async def show(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        body = await read_body(request)
        model = body.get("model") or body.get("name")
        if not isinstance(model, str) or not model:
            return ollama_error(400, "model is required")
        check_model(key, model)
        return await forward(
            gw.http, hosts_for(await gw.workers(), model), "POST", "/api/show", body
        )

    @router.get("/tags")
    async def tags(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        workers = await gw.workers()
        merged = await gather_models(gw.http, hosts_for(workers), "/api/tags", key)
        # Only what a live worker serves: picking another one would be refused (not_served).
        names = [str(m.get("name") or m.get("model") or "") for m in merged["models"]]
        merged["models"] = [
            m for m, name in zip(merged["models"], names, strict=True) if serves(workers, name)
        ]
        return JSONResponse(merged)

    @router.get("/ps")
    async def ps(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        merged = await gather_models(gw.http, hosts_for(await gw.workers()), "/api/ps", key)
        return JSONResponse(merged)

    @router.get("/version")
    async def version(request: Request, key: Key) -> Response:
        gw: Gateway = gateway_of(request)
        return await forward(gw.http, hosts_for(await gw.workers()), "GET", "/api/version")

    return router


PRIORITY_HEADER = "X-Corral-Priority"


async def submit(
    request: Request, gw: Gateway, kind: str, data: dict[str, Any], key: ApiKey | None, model: str
) -> Submitted:
    """Submit as the native API does, with the priority of the ``X-Corral-Priority`` header
    (0-9, higher sooner; capped by the key). A model nobody serves is Ollama's own 404."""
    raw = request.headers.get(PRIORITY_HEADER)
    priority = None
    if raw is not None:
        if not raw.strip().isdigit():
            raise Refusal(
                400,
                "InvalidRequest",
                f"{PRIORITY_HEADER}: expected an integer from 0 to 9, got {raw!r}",
            )
        priority = int(raw)
    try:
        return await gw.submit(kind, data, key, priority=priority)
    except ModelNotFound as exc:
        raise Refusal(404, "ModelNotFound", f"model '{model}' not found") from exc


async def read_body(request: Request) -> dict[str, Any]:
    """The JSON body, decoded as Ollama's Go decoder does: bytes that are not UTF-8 and unpaired
    surrogates (``"\\ud800"``) become U+FFFD rather than errors. Too deep a body is refused."""
    raw = await request.body()
    if not raw:
        raise Refusal(400, "InvalidRequest", "missing request body")
    limit = gateway_of(request).settings.max_json_depth
    try:
        body = parse_json(
            raw.decode("utf-8", errors="replace"), what="the request body", max_depth=limit
        )
    except InvalidRequest as exc:
        raise Refusal(400, "InvalidRequest", exc.message) from exc
    if not isinstance(body, dict):
        raise Refusal(400, "InvalidRequest", "the request body must be a JSON object")
    return replace_lone_surrogates(body)


# The types Ollama's request structs give the fields the facade reads: a JSON value of another
# type fails Go's decoding, which Ollama answers with 400 and Go's own text.
GoType = tuple[str, str, tuple[str, str] | None]  # Go type, JSON kind, element (type, kind)
_STRING: GoType = ("string", "string", None)
_BOOL: GoType = ("bool", "bool", None)
_COMMON_TYPES: dict[str, GoType] = {
    "model": _STRING,
    "stream": _BOOL,
    "truncate": _BOOL,
    "shift": _BOOL,
    "logprobs": _BOOL,
    "top_logprobs": ("int", "number", None),
    "options": ("map[string]interface {}", "object", None),
}
GENERATE_TYPES: dict[str, GoType] = {
    **_COMMON_TYPES,
    "prompt": _STRING,
    "suffix": _STRING,
    "system": _STRING,
    "template": _STRING,
    "raw": _BOOL,
    "context": ("[]int", "array", ("int", "number")),
    "images": ("[]api.ImageData", "array", ("api.ImageData", "string")),
}
CHAT_TYPES: dict[str, GoType] = {
    **_COMMON_TYPES,
    "messages": ("[]api.Message", "array", ("api.Message", "object")),
    "tools": ("api.Tools", "array", ("api.Tool", "object")),
}


def json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def check_go_types(body: dict[str, Any], struct: str, types: dict[str, GoType]) -> None:
    """Refuse, with Go's text, a field whose JSON type Ollama's struct cannot take."""
    for name, value in body.items():
        if name not in types or value is None:
            continue
        gotype, kind, elem = types[name]
        checks = [(value, gotype, kind)]
        if elem is not None and isinstance(value, list):
            checks += [(item, *elem) for item in value if item is not None]
        for item, item_type, item_kind in checks:
            if json_kind(item) != item_kind:
                raise Refusal(
                    400,
                    "InvalidRequest",
                    f"json: cannot unmarshal {json_kind(item)} "
                    f"into Go struct field {struct}.{name} of type {item_type}",
                )


async def not_served(gw: Gateway, model: str) -> Response | None:
    """Ollama's own 404, at once, for a model no live worker serves: its task would wait in
    silence, and Ollama clients know no "queued". An invalid name is left to the payload
    check (400)."""
    try:
        queue_name(model)
    except InvalidRequest:
        return None
    if serves(await gw.recent_workers(), model):
        return None
    return ollama_error(404, f"model '{model}' not found")


def check_model(key: ApiKey | None, model: str) -> None:
    if key is not None and not key.allows(model):
        raise Refusal(403, "ModelNotAllowed", f"this key may not use model '{model}'")


def clean_options(options: Any) -> Any:
    """Ollama ignores option names it does not know; so does the facade (the SDK refuses them)."""
    if isinstance(options, dict):
        return {k: v for k, v in options.items() if k in OPTION_FIELDS and v is not None} or None
    return options


def clean_message(message: Any) -> Any:
    if isinstance(message, dict):
        return {k: v for k, v in message.items() if k in MESSAGE_FIELDS and v is not None}
    return message


# -- the reply, relayed from the task's events -------------------------------------------------
class Shaper:
    """Builds Ollama's chunks for one request."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat

    def delta(self, text: str = "", thinking: str = "") -> dict[str, Any]:
        head = {"model": self.model, "created_at": created_at()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            return {**head, "message": message, "done": False}
        out: dict[str, Any] = {**head, "response": text}
        if thinking:
            out["thinking"] = thinking
        return {**out, "done": False}

    def final(self, result: dict[str, Any], whole: bool) -> dict[str, Any]:
        """The ``done`` chunk; ``whole`` puts the full text in it (``stream: false``)."""
        typed = parse_result(result)
        head: dict[str, Any] = {"model": self.model, "created_at": created_at()}
        if self.chat:
            text = getattr(typed, "text", "") if whole else ""
            message: dict[str, Any] = {"role": "assistant", "content": text}
            extra = result.get("message") or {}
            if whole and extra.get("thinking"):
                message["thinking"] = extra["thinking"]
            if extra.get("tool_calls"):
                message["tool_calls"] = extra["tool_calls"]
            head["message"] = message
        else:
            head["response"] = getattr(typed, "text", "") if whole else ""
            if whole and result.get("thinking"):
                head["thinking"] = result["thinking"]
        head["done"] = True
        if typed.done_reason:
            head["done_reason"] = typed.done_reason
        if not self.chat and result.get("context"):
            head["context"] = result["context"]
        metrics = typed.metrics.model_dump()
        head.update({k: metrics[k] for k in METRIC_FIELDS if metrics.get(k)})  # zero: omitted
        return head


async def reply(
    request: Request, gw: Gateway, submitted: Submitted, model: str, stream: bool, *, chat: bool
) -> Response:
    job = submitted.job
    events = follow(gw.redis, job.id, on_idle=lambda: gw.outcome(job))
    shaper = Shaper(model, chat)
    headers = submitted.headers
    try:
        if not stream:
            terminal = await until_disconnect(request, terminal_of(events))
            await events.aclose()
            return _whole(gw, shaper, terminal, model, headers)
        first = await until_disconnect(request, _first_output(events))
    except Disconnected:
        with anyio.CancelScope(shield=True):
            await events.aclose()
        await cancel_task(gw, submitted)
        return Response(status_code=499)
    if first["type"] in TERMINAL_TYPES and first["type"] != "done":
        await events.aclose()
        return _whole(gw, shaper, first, model, headers)
    body = _chunks(gw, submitted, shaper, first, events)
    return DisconnectAwareStream(body, media_type=NDJSON, headers=headers)


async def _first_output(events: AsyncGenerator[dict[str, Any] | None, None]) -> dict[str, Any]:
    async for event in events:
        if event is not None and event["type"] in ("token", "thinking", *TERMINAL_TYPES):
            return event
    raise CorralError("the task's event stream ended without a terminal event")


async def terminal_of(events: AsyncGenerator[dict[str, Any] | None, None]) -> dict[str, Any]:
    async for event in events:
        if event is not None and event["type"] in TERMINAL_TYPES:
            return event
    raise CorralError("the task's event stream ended without a terminal event")


def _whole(
    gw: Gateway, shaper: Shaper, terminal: dict[str, Any], model: str, headers: dict[str, str]
) -> Response:
    if terminal["type"] == "done":
        return JSONResponse(shaper.final(terminal["result"], whole=True), headers=headers)
    error = error_of(terminal)
    return ollama_error(ollama_status(error), ollama_message(error, model), headers)


def error_of(terminal: dict[str, Any]) -> CorralError:
    if terminal["type"] == "cancelled":
        return TaskCancelled(str(terminal.get("reason", "cancelled")))
    return error_from_dict(terminal.get("error") or {})


async def _chunks(
    gw: Gateway,
    submitted: Submitted,
    shaper: Shaper,
    first: dict[str, Any],
    events: AsyncGenerator[dict[str, Any] | None, None],
) -> AsyncIterator[bytes]:
    finished = False
    try:
        event: dict[str, Any] | None = first
        while True:
            if event is not None:
                kind = event["type"]
                if kind == "token":
                    yield line(shaper.delta(text=event["text"]))
                elif kind == "thinking":
                    yield line(shaper.delta(thinking=event["text"]))
                elif kind == "restart":
                    # Ollama clients cannot take text back: end as Ollama does on a failure.
                    yield line(
                        {
                            "error": "the model failed mid-stream and the task started "
                            "over; send the request again"
                        }
                    )
                    return
                elif kind == "done":
                    finished = True
                    yield line(shaper.final(event["result"], whole=False))
                    return
                elif kind in TERMINAL_TYPES:
                    finished = True
                    yield line({"error": ollama_message(error_of(event), shaper.model)})
                    return
            event = await anext(events, _END)  # type: ignore[arg-type]
            if event is _END:
                return
    finally:
        with anyio.CancelScope(shield=True):
            await events.aclose()  # type: ignore[attr-defined]
        if not finished:
            await cancel_task(gw, submitted)


async def cancel_task(gw: Gateway, submitted: Submitted) -> None:
    """Cancel the task of a client that went away (shielded: we are often being cancelled)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(CorralError):
        await run_in_threadpool(submitted.job.cancel)
