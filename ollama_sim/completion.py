"""``POST /api/generate`` and ``POST /api/chat``: validation, scheduling and delivery."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ModelSpec
from .faults import FaultPlan
from .generation import ChunkEncoder, Delivery, RunnerError
from .gojson import dumps
from .golike import parse_model_name, utc_timestamp
from .http import JSON_TYPE, NDJSON_TYPE, ClientDisconnected, Request, Response
from .images import NO_VISION, UNKNOWN_FORMAT, ImageInfo, sniff
from .parts import Handlers
from .replies import ReplyRequest, compose, token_budget
from .scheduler import RunnerOptions, ServerBusy
from .stats import EventLog
from .validation import (
    CHAT,
    GENERATE,
    ApiError,
    check_format,
    check_options,
    decode,
    decode_images,
)


@dataclass
class Call:
    """One validated generate or chat request."""

    request: Request
    chat: bool
    model_sent: str
    spec: ModelSpec
    stream: bool
    keep_alive_s: float | None
    options: dict[str, Any]
    fmt: Any
    think: bool
    load_only: bool
    prompt: str
    prompt_all: str
    seed_material: Any
    images: list[bytes] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    last_role: str = "user"
    raw: bool = False
    start_ns: int = 0
    top_logprobs: int | None = None  # None: no logprobs asked for


def send_error(
    response: Response, events: EventLog, request: Request, status: int, message: str
) -> None:
    """Answer ``{"error": message}`` with ``status`` and log it."""
    response.send(status, dumps({"error": message}).encode())
    events.emit("error", request_id=request.request_id, status=status, error=message)


class Completions(Handlers):
    """The generate and chat handlers, sharing one scheduling and delivery path."""

    # --- request parsing -----------------------------------------------------------------------

    async def generate(self, request: Request, response: Response) -> None:
        start_ns = time.perf_counter_ns()
        body = decode(request.body, GENERATE)
        images = decode_images(body.get("images"))
        _check_logprobs(body)
        model = body.get("model") or ""
        spec = self._model_or_404(model)
        if body.get("raw") and (body.get("template") or body.get("system") or body.get("context")):
            raise ApiError(400, "raw mode does not support template, system, or context")
        prompt = body.get("prompt") or ""
        if not prompt and body["keep_alive"] == 0:
            return self._unload(response, spec, model, chat=False)
        if not spec.has("completion"):
            raise ApiError(400, f"{dumps(model)} does not support generate")
        think = self._think(spec, model, body["think"])
        if body.get("suffix") and not spec.has("insert"):
            raise ApiError(400, f"{spec.full_name} does not support insert")
        text = "\n".join(filter(None, (body.get("system"), prompt, body.get("suffix"))))
        call = Call(
            request=request,
            chat=False,
            model_sent=model,
            spec=spec,
            stream=body.get("stream") is not False,
            keep_alive_s=body["keep_alive"],
            options=check_options(body.get("options")),
            fmt=body.get("format"),
            think=think,
            load_only=not prompt,
            prompt=prompt,
            prompt_all=text,
            seed_material=["generate", text, _digests(images), body.get("format")],
            images=images,
            raw=bool(body.get("raw")),
            start_ns=start_ns,
            top_logprobs=_logprobs_wanted(body),
        )
        await self._complete(call, response)

    async def chat(self, request: Request, response: Response) -> None:
        start_ns = time.perf_counter_ns()
        body = decode(request.body, CHAT)
        messages = [m for m in body.get("messages") or [] if m is not None]
        images = [img for m in messages for img in decode_images(m.get("images"))]
        _check_logprobs(body)
        model = body.get("model") or ""
        if parse_model_name(model) is None:
            raise ApiError(400, "model is required")
        spec = self._model_or_404(model)
        if not messages and body["keep_alive"] == 0:
            return self._unload(response, spec, model, chat=True)
        if not spec.has("completion"):
            raise ApiError(400, f"{dumps(model)} does not support chat")
        think = self._think(spec, model, body["think"])
        tools = [t for t in body.get("tools") or [] if t]
        if tools and not spec.has("tools"):
            raise ApiError(400, f"{spec.full_name} does not support tools")
        last = messages[-1] if messages else {}
        text = "\n".join(m.get("content") or "" for m in messages)
        material = [[m.get("role"), m.get("content"), m.get("tool_calls")] for m in messages]
        call = Call(
            request=request,
            chat=True,
            model_sent=model,
            spec=spec,
            stream=body.get("stream") is not False,
            keep_alive_s=body["keep_alive"],
            options=check_options(body.get("options")),
            fmt=body.get("format"),
            think=think,
            load_only=not messages,
            prompt=last.get("content") or "",
            prompt_all=text,
            seed_material=[
                "chat",
                material,
                _digests(images),
                body.get("format"),
                [((t.get("function") or {}).get("name")) for t in tools],
            ],
            images=images,
            tools=tools,
            last_role=(last.get("role") or "user").lower(),
            start_ns=start_ns,
            top_logprobs=_logprobs_wanted(body),
        )
        await self._complete(call, response)

    def _model_or_404(self, model: str) -> ModelSpec:
        spec = self.config.find_model(model)
        if spec is None:
            raise ApiError(404, f"model '{model}' not found")
        return spec

    def _think(self, spec: ModelSpec, model: str, think: bool | str | None) -> bool:
        if think is None:
            return spec.has("thinking")
        if think and not spec.has("thinking"):
            raise ApiError(400, f"{dumps(model)} does not support thinking")
        return bool(think)

    def _unload(self, response: Response, spec: ModelSpec, model: str, chat: bool) -> None:
        self.scheduler.expire(spec)
        response.send(200, dumps(_bare_reply(model, chat, "unload")).encode())

    # --- scheduling and delivery ---------------------------------------------------------------

    async def _complete(self, call: Call, response: Response) -> None:
        request = call.request
        fault = (
            FaultPlan()
            if call.load_only
            else self.faults.plan(
                "chat" if call.chat else "generate", call.spec.name, call.prompt_all
            )
        )
        self._record_faults(fault, request, call.spec.name)
        if fault.close:
            response.abort()
            return
        stage = "queued"
        try:
            if fault.status == 503:
                raise RunnerError(503, fault.error)
            runner_options = RunnerOptions.from_options(
                call.spec, call.options, self.config.default_num_ctx
            )
            try:
                runner = await self.scheduler.acquire(
                    call.spec, runner_options, call.keep_alive_s, request.request_id
                )
            except ServerBusy as exc:
                raise ApiError(503, str(exc)) from exc
            load_ns = max(1, time.perf_counter_ns() - call.start_ns)
            try:
                if call.load_only:
                    response.send(
                        200, dumps(_bare_reply(call.model_sent, call.chat, "load")).encode()
                    )
                    return
                infos = self._runner_checks(call)
                reply = compose(
                    ReplyRequest(
                        model=call.spec,
                        prompt=call.prompt,
                        seed_material=call.seed_material,
                        prompt_text_len=len(call.prompt_all),
                        last_role=call.last_role,
                        images=infos,
                        think=call.think,
                        fmt=check_format(call.fmt),
                        tools=call.tools,
                        options=call.options,
                        invalid_format=fault.invalid_format,
                        base_seed=self.config.seed,
                        max_tokens=token_budget(
                            call.options, runner.options.num_ctx, self.config.max_reply_tokens
                        ),
                    )
                )
                stage = "waiting_slot"
                await runner.slots.acquire()
                try:
                    stage = "generating"
                    self.stats.generations_started += 1
                    await self._delivery(call, response, reply, fault, load_ns).run()
                finally:
                    runner.slots.release()
            finally:
                self.scheduler.release(runner)
        except (asyncio.CancelledError, ClientDisconnected):
            self.record_disconnect(request, call.spec.name, stage)
            raise
        except RunnerError as exc:
            self._fail(call, response, fault, exc.status, exc.message)

    def _runner_checks(self, call: Call) -> list[ImageInfo]:
        """Errors the runner itself reports once the model is loaded."""
        try:
            check_format(call.fmt)
        except ApiError as exc:
            raise RunnerError(exc.status, exc.message) from exc
        if call.images and not call.spec.has("vision"):
            raise RunnerError(400, NO_VISION)
        infos = []
        for data in call.images:
            info = sniff(data)
            if info is None:
                raise RunnerError(500, UNKNOWN_FORMAT)
            infos.append(info)
        return infos

    def _delivery(
        self, call: Call, response: Response, reply: Any, fault: FaultPlan, load_ns: int
    ) -> Delivery:
        spec = call.spec
        if call.stream:
            response.prepare_stream(200, NDJSON_TYPE)
        context = None if call.chat or call.raw else reply.context_ids(call.prompt_all)
        return Delivery(
            response=response,
            stream=call.stream,
            encoder=ChunkEncoder(call.chat, call.model_sent, call.top_logprobs),
            reply=reply,
            context=context,
            first_token_s=self.config.delay(spec.first_token_s),
            token_interval_s=self.config.delay(1.0 / spec.tokens_per_s)
            if spec.tokens_per_s
            else 0.0,
            fault=fault,
            stats=self.stats,
            events=self.events,
            request_id=call.request.request_id,
            model=spec.name,
            start_ns=call.start_ns,
            load_ns=load_ns,
        )

    def _fail(
        self, call: Call, response: Response, fault: FaultPlan, status: int, message: str
    ) -> None:
        if response.started:
            raise RuntimeError("cannot report an error after the stream started")
        if call.stream and fault.legacy:
            # Servers before v0.12.6 had already answered 200 when the runner failed.
            body = dumps({"error": message}).encode() + b"\n"
            response.send(200, body, NDJSON_TYPE)
            self.events.emit(
                "error", request_id=call.request.request_id, status=200, error=message, legacy=True
            )
            return
        send_error(response, self.events, call.request, status, message)

    def _record_faults(self, fault: FaultPlan, request: Request, model: str) -> None:
        for name in fault.applied:
            self.stats.faults_injected[name] += 1
            self.events.emit(
                "fault",
                request_id=request.request_id,
                model=model,
                fault=name,
                peer_port=request.peer_port,
            )


def _logprobs_wanted(body: dict[str, Any]) -> int | None:
    """How many alternatives each token's logprobs list, or None without ``logprobs: true``."""
    return int(body.get("top_logprobs") or 0) if body.get("logprobs") else None


def _check_logprobs(body: dict[str, Any]) -> None:
    top = body.get("top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")


def _digests(images: list[bytes]) -> list[str]:
    return [hashlib.sha256(image).hexdigest()[:16] for image in images]


def _bare_reply(model: str, chat: bool, reason: str) -> dict[str, Any]:
    """The single object answering a load or unload request."""
    obj: dict[str, Any] = {"model": model, "created_at": utc_timestamp()}
    if chat:
        obj["message"] = {"role": "assistant", "content": ""}
    else:
        obj["response"] = ""
    obj["done"] = True
    obj["done_reason"] = reason
    return obj


__all__ = ["Completions", "send_error", "JSON_TYPE"]
