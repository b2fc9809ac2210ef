"""What each task kind does inside a worker: build the Ollama request, stream it, shape the result.

Every kind streams from Ollama and relays its chunks through the task's
:class:`~tasks.publisher.StreamPublisher`. Retryable failures get further attempts here, in the
same worker slot, and an attempt that follows published tokens starts with a ``restart`` event.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from jsonschema import Draft202012Validator

from tasks.errors import (
    InvalidRequest,
    RetryableError,
    StructuredOutputError,
    TaskCancelled,
    TaskTimeout,
)
from tasks.images import decode_base64_image, encode_base64, inspect_image
from tasks.keys import blob_key
from tasks.ollama_boundary import translated
from tasks.payloads import (
    ChatPayload,
    GeneratePayload,
    ImagePart,
    Message,
    MultimodalPayload,
    Payload,
    StructuredPayload,
)
from tasks.publisher import StreamPublisher
from tasks.results import METRIC_FIELDS, AssistantMessage, OllamaMetrics, Timings
from tasks.settings import Settings
from workers.ollama_client import OllamaClient, StreamAbort

T = TypeVar("T")


@dataclass
class Reply:
    """What one streamed call to Ollama produced."""

    text: str = ""
    thinking: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


@dataclass
class Execution:
    """One task run: its tools, its clock and its running attempt count."""

    task_id: str
    settings: Settings
    ollama: OllamaClient
    redis: redis.Redis
    publisher: StreamPublisher
    timings: Timings
    deadline: float  # time.time() after which no new attempt starts
    abort: StreamAbort | None = None  # fired by the lease heartbeat on cancel
    attempts: int = 0

    # -- streaming ---------------------------------------------------------------------
    def stream(self, path: str, body: dict[str, Any]) -> Reply:
        """Stream one request from Ollama, relaying tokens; the result of a single attempt."""
        reply = Reply()
        is_chat = path == "/api/chat"
        chunks = translated(
            self.ollama.stream(path, body, should_stop=self._should_stop, abort=self.abort)
        )
        for chunk in chunks:
            part = chunk.get("message") or {} if is_chat else chunk
            thinking = part.get("thinking") or ""
            text = part.get("content" if is_chat else "response") or ""
            if thinking:
                reply.thinking += thinking
                self._first_token()
                self.publisher.emit("thinking", text=thinking)
            if text:
                reply.text += text
                self._first_token()
                self.publisher.emit("token", text=text)
            if part.get("tool_calls"):
                reply.tool_calls.extend(part["tool_calls"])
            if chunk.get("done"):
                reply.final = chunk
        return reply

    def _should_stop(self) -> bool:
        if time.time() > self.deadline:
            raise TaskTimeout(
                "the task's deadline passed while generating",
                task_id=self.task_id,
            )
        return self.publisher.cancel_requested

    def _first_token(self) -> None:
        if self.timings.first_token_at is None:
            self.timings.first_token_at = time.time()

    # -- attempts ----------------------------------------------------------------------
    def with_attempts(self, call: Callable[[], T]) -> T:
        """Run ``call`` until it succeeds, fails permanently, or the attempt budget is spent."""
        limit = self.settings.task_attempts
        for attempt in range(1, limit + 1):
            self.attempts += 1
            if attempt > 1 and self.publisher.text_since_start:
                self.publisher.emit(
                    "restart", attempt=self.attempts, reason="retrying after a failure"
                )
            try:
                return call()
            except RetryableError as exc:
                exc.with_info(attempts=self.attempts, task_id=self.task_id)
                backoff_s = self._backoff(attempt)
                if attempt == limit or time.time() + backoff_s > self.deadline:
                    raise
                self._sleep_unless_cancelled(backoff_s)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        base = self.settings.retry_backoff_s * (2 ** (attempt - 1))
        return min(self.settings.retry_backoff_max_s, base) * random.uniform(0.5, 1.0)

    def _sleep_unless_cancelled(self, seconds: float) -> None:
        """Back off; the lease heartbeat raises the publisher's cancel flag meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))
            if self.publisher.cancel_requested:
                raise TaskCancelled("cancelled while waiting to retry", task_id=self.task_id)

    # -- images ------------------------------------------------------------------------
    def image_b64(self, image: ImagePart | str, where: str) -> str:
        """Base64 for Ollama, fetching blobs sent by reference, re-checking every image."""
        max_bytes = self.settings.max_image_bytes
        if isinstance(image, str):
            data = decode_base64_image(image, field=where)
        elif image.data is not None:
            data = decode_base64_image(image.data, field=where)
        else:
            stored = self.redis.get(blob_key(image.sha256))
            if stored is None:
                raise InvalidRequest(
                    f"{where}: the image sent by reference ({image.sha256[:12]}…) has expired; "
                    "submit the task again (or raise CORRAL_BLOB_TTL_S)",
                    field=where,
                )
            data = bytes(stored)
        inspect_image(data, max_bytes=max_bytes, field=where)
        return encode_base64(data)

    def messages_json(self, messages: list[Message]) -> list[dict[str, Any]]:
        out = []
        for i, message in enumerate(messages):
            item = message.model_dump(mode="json", exclude_none=True, exclude={"images"})
            if message.images:
                item["images"] = [
                    self.image_b64(img, f"messages[{i}].images[{j}]")
                    for j, img in enumerate(message.images)
                ]
            out.append(item)
        return out


def _common_body(payload: Payload) -> dict[str, Any]:
    body: dict[str, Any] = {"model": payload.model}
    if payload.options is not None:
        body["options"] = payload.options.model_dump(exclude_none=True)
    if payload.keep_alive is not None:
        body["keep_alive"] = payload.keep_alive
    return body


def _base_result(run: Execution, payload: Payload, kind: str, reply: Reply) -> dict[str, Any]:
    metrics = OllamaMetrics(**{k: reply.final[k] for k in METRIC_FIELDS if k in reply.final})
    return {
        "task_id": run.task_id,
        "kind": kind,
        "model": payload.model,
        "done_reason": reply.final.get("done_reason"),
        "metrics": metrics.model_dump(exclude_none=True),
        "attempts": run.attempts,
    }


def run_generate(run: Execution, payload: GeneratePayload) -> dict[str, Any]:
    body = _common_body(payload)
    body["prompt"] = payload.prompt
    for name in ("system", "format", "think", "context"):
        if getattr(payload, name) is not None:
            body[name] = getattr(payload, name)
    if payload.raw:
        body["raw"] = True
    reply = run.with_attempts(lambda: run.stream("/api/generate", body))
    result = _base_result(run, payload, "generate", reply)
    result["text"] = reply.text
    if reply.thinking:
        result["thinking"] = reply.thinking
    if reply.final.get("context"):
        result["context"] = reply.final["context"]
    return result


def run_chat(run: Execution, payload: ChatPayload) -> dict[str, Any]:
    body = _common_body(payload)
    body["messages"] = run.messages_json(payload.messages)
    if payload.tools:
        body["tools"] = [tool.model_dump(mode="json") for tool in payload.tools]
    for name in ("format", "think"):
        if getattr(payload, name) is not None:
            body[name] = getattr(payload, name)
    reply = run.with_attempts(lambda: run.stream("/api/chat", body))
    result = _base_result(run, payload, "chat", reply)
    message = AssistantMessage(
        content=reply.text, thinking=reply.thinking or None, tool_calls=reply.tool_calls or None
    )
    result["message"] = message.model_dump(exclude_none=True)
    return result


def schema_instruction(schema: dict[str, Any]) -> str:
    return "\n\nRespond with JSON only, no prose, matching this JSON Schema:\n" + json.dumps(
        schema, separators=(",", ":")
    )


def run_structured(run: Execution, payload: StructuredPayload) -> dict[str, Any]:
    """Ask with the schema as ``format`` and in the prompt; validate; correct once."""
    schema = payload.schema_
    messages = payload.as_messages()
    last_user = max(i for i, m in enumerate(messages) if m.role in ("user", "system"))
    messages[last_user] = messages[last_user].model_copy(
        update={"content": messages[last_user].content + schema_instruction(schema)}
    )
    body = _common_body(payload)
    body["format"] = schema
    if payload.think is not None:
        body["think"] = payload.think
    validator = Draft202012Validator(schema)
    conversation = run.messages_json(messages)
    for round_number in (1, 2):
        body["messages"] = conversation
        reply = run.with_attempts(lambda: run.stream("/api/chat", dict(body)))
        problem = _schema_problem(reply.text, validator)
        if problem is None:
            result = _base_result(run, payload, "structured", reply)
            result["data"] = json.loads(reply.text)
            result["raw_text"] = reply.text
            return result
        if round_number == 2:
            raise StructuredOutputError(
                f"the model's reply does not match the schema after a corrective retry: {problem}",
                raw_text=reply.text,
                model=payload.model,
                task_id=run.task_id,
                attempts=run.attempts,
            )
        run.publisher.emit("restart", attempt=run.attempts + 1, reason=f"invalid reply: {problem}")
        conversation = [
            *conversation,
            {"role": "assistant", "content": reply.text},
            {"role": "user", "content": f"That reply is invalid: {problem}. Reply again with "
             "only the JSON document, matching the schema."},
        ]  # fmt: skip
    raise AssertionError("unreachable")  # pragma: no cover


def _schema_problem(text: str, validator: Draft202012Validator) -> str | None:
    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    error = next(iter(validator.iter_errors(data)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"


def run_multimodal(run: Execution, payload: MultimodalPayload) -> dict[str, Any]:
    messages = payload.as_messages()
    if payload.images:
        messages[-1] = messages[-1].model_copy(update={"images": list(payload.images)})
    body = _common_body(payload)
    body["messages"] = run.messages_json(messages)
    reply = run.with_attempts(lambda: run.stream("/api/chat", body))
    result = _base_result(run, payload, "multimodal", reply)
    result["text"] = reply.text
    return result


RUNNERS: dict[str, Callable[[Execution, Any], dict[str, Any]]] = {
    "generate": run_generate,
    "chat": run_chat,
    "structured": run_structured,
    "multimodal": run_multimodal,
}
