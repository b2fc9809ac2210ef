"""A batch's input, read one line at a time: each line becomes a task, or a typed refusal.

A line is ``{"custom_id", "method": "POST", "url", "body"}`` as in OpenAI's Batch API, with
``url`` one of :data:`URLS` or corral's own ``/v1/tasks/{kind}``. A bad line (not JSON, an
unknown url, a body that fails validation, a model no worker serves, a repeated custom_id) is
given back as a :class:`Rejected` and the reading goes on; the file is never held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tasks.errors import CorralError, InvalidRequest, ModelNotFound
from tasks.keys import canonical_model
from tasks.kinds import registry
from tasks.openai import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_task,
    completion_task,
    embedding_task,
)
from tasks.openai.errors import snake_case
from tasks.payloads import dump_payload, invalid_request_from, validate_payload
from tasks.settings import Settings
from tasks.untrusted import parse_json

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
TASKS_URL = "/v1/tasks/"  # followed by a kind's name
MAX_CUSTOM_ID = 512  # characters; OpenAI's limit is not published, 512 is generous
MAX_LINE_BYTES = 16 * 2**20  # one request; far above any prompt the input limits accept

Converter = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]


def _openai(
    model: type[BaseModel], convert: Callable[[Any], tuple[str, dict[str, Any]]], what: str
) -> Converter:
    def converter(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        try:
            parsed = model.model_validate(body)
        except ValidationError as exc:
            raise invalid_request_from(exc, what) from exc
        if getattr(parsed, "stream", False):
            raise InvalidRequest(
                "body.stream: a batch line cannot be streamed; leave stream out", field="stream"
            )
        return convert(parsed)

    return converter


# The OpenAI urls a line may name, and how its body becomes a task (kind, payload data).
URLS: dict[str, Converter] = {
    CHAT_URL: _openai(ChatRequest, chat_task, "chat completion"),
    COMPLETIONS_URL: _openai(CompletionRequest, completion_task, "completion"),
    EMBEDDINGS_URL: _openai(EmbeddingRequest, embedding_task, "embeddings"),
}


@dataclass(frozen=True)
class Line:
    """A valid line: the task it becomes."""

    number: int  # 1-based, as editors count
    custom_id: str
    url: str
    kind: str
    data: dict[str, Any]  # the validated payload, ready for submission
    model: str
    encoding_format: str = "float"  # how an embeddings reply encodes its vectors


@dataclass(frozen=True)
class Rejected:
    """A line refused as it was read; ``entry`` names it in the error file's idempotency set."""

    number: int
    custom_id: str | None
    code: str
    message: str

    @property
    def entry(self) -> str:
        # A repeated custom_id must not hide the first line's outcome: name the line too.
        return f"{self.custom_id}#line{self.number}" if self.custom_id else f"#line{self.number}"


def task_of(url: str, body: Any) -> tuple[str, dict[str, Any]]:
    """The task kind and payload data a request to ``url`` with ``body`` becomes."""
    if not isinstance(body, dict):
        raise InvalidRequest("body: expected a JSON object (the request body)", field="body")
    if url in URLS:
        return URLS[url](body)
    if url.startswith(TASKS_URL) and url[len(TASKS_URL) :] in registry:
        return url[len(TASKS_URL) :], body
    known = ", ".join([*URLS, *(TASKS_URL + name for name in registry.names())])
    raise InvalidRequest(f"url: {url!r} is not served in a batch; use one of {known}", field="url")


def read_lines(
    source: Iterable[bytes | str],
    settings: Settings,
    served: Callable[[str], bool],
    endpoint: str | None = None,
) -> Iterator[Line | Rejected]:
    """Each line of ``source`` checked: a :class:`Line` to submit or a :class:`Rejected`.

    ``served(model)`` says whether a live worker serves a canonical model name; with
    ``endpoint`` (an OpenAI batch has one), a line naming another url is refused. Blank lines
    are skipped, as OpenAI does.
    """
    seen: set[str] = set()  # custom_ids so far: a few MB for 50,000 lines, never the lines
    for number, raw in enumerate(source, start=1):
        text = raw.strip()
        if not text:
            continue
        custom_id: str | None = None
        try:
            if len(text) > MAX_LINE_BYTES:
                raise InvalidRequest(
                    f"the line is longer than {MAX_LINE_BYTES} bytes; split the request",
                    field="line",
                )
            item = parse_json(text, what=f"line {number}", max_depth=settings.max_json_depth + 1)
            if not isinstance(item, dict):
                raise InvalidRequest(
                    f"line {number}: expected a JSON object with custom_id, method, url and body",
                    field="line",
                )
            custom_id = _custom_id(item.get("custom_id"))
            if custom_id in seen:
                raise InvalidRequest(
                    f"custom_id {custom_id!r} was already used by an "
                    "earlier line; give every line its own",
                    field="custom_id",
                )
            seen.add(custom_id)
            if item.get("method", "POST") != "POST":
                raise InvalidRequest(
                    'method: only POST is served; send "method": "POST"', field="method"
                )
            url = item.get("url")
            if not isinstance(url, str):
                raise InvalidRequest(
                    f"url: missing; name the endpoint, e.g. {CHAT_URL!r}", field="url"
                )
            if endpoint is not None and url != endpoint:
                raise InvalidRequest(
                    f"url: {url!r} differs from the batch's endpoint "
                    f"{endpoint!r}; send it in its own batch",
                    field="url",
                )
            kind, data = task_of(url, item.get("body"))
            clean = {k: v for k, v in data.items() if v is not None}
            payload = validate_payload(kind, clean, settings)
            model = canonical_model(payload.model)
            if not served(model):
                raise ModelNotFound(
                    f"no live worker serves the model {model!r}; start one "
                    f"(corral worker --model {model}) and submit again",
                    model=model,
                )
        except CorralError as exc:
            yield Rejected(
                number, custom_id, snake_case(type(exc).__name__), f"line {number}: {exc.message}"
            )
            continue
        body = item["body"]
        encoding = "base64" if body.get("encoding_format") == "base64" else "float"
        yield Line(number, custom_id, url, kind, dump_payload(payload), model, encoding)


def _custom_id(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequest(
            "custom_id: missing; give every line a unique custom_id string", field="custom_id"
        )
    if len(value) > MAX_CUSTOM_ID:
        raise InvalidRequest(
            f"custom_id: longer than {MAX_CUSTOM_ID} characters; shorten it", field="custom_id"
        )
    return value
