"""``chat``: one assistant turn after a conversation, as Ollama's ``/api/chat``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

import click
from pydantic import ValidationInfo, field_validator

from tasks.errors import InvalidRequest
from tasks.kinds.base import (
    CliCommand,
    JobT,
    MessageLike,
    SdkOptions,
    SubmitOptions,
    Submitter,
    TaskKind,
)
from tasks.kinds.cli_input import TextArgument
from tasks.kinds.runner import request_body, result_fields
from tasks.payloads import BasePayload, Message, Tool, check_messages, check_schema
from tasks.results import AssistantMessage, TaskResult
from tasks.settings import load_settings
from tasks.untrusted import parse_json

if TYPE_CHECKING:
    from tasks.execution import Execution

NAME = "chat"


class ChatPayload(BasePayload):
    """Multi-turn chat, as ``/api/chat``: the caller sends the whole history."""

    messages: list[Message]
    tools: list[Tool] | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    format: Literal["json"] | dict[str, Any] | None = None

    _messages = field_validator("messages")(check_messages)

    @field_validator("format")
    @classmethod
    def _format(cls, value: Any, info: ValidationInfo) -> Any:
        return check_schema(value, info) if isinstance(value, dict) else value


class ChatResult(TaskResult):
    kind: Literal["chat"] = "chat"
    message: AssistantMessage

    @property
    def text(self) -> str:
        return self.message.content


def run_chat(run: Execution, payload: ChatPayload) -> ChatResult:
    body = request_body(payload)
    body["messages"] = run.messages_json(payload.messages)
    if payload.tools:
        body["tools"] = [tool.model_dump(mode="json") for tool in payload.tools]
    for name in ("format", "think"):
        if getattr(payload, name) is not None:
            body[name] = getattr(payload, name)
    reply = run.with_attempts(lambda: run.stream("/api/chat", body))
    message = AssistantMessage(
        content=reply.text, thinking=reply.thinking or None, tool_calls=reply.tool_calls or None
    )
    return ChatResult(**result_fields(run, payload, reply), message=message)


def chat(
    client: Submitter[JobT],
    model: str,
    messages: Sequence[MessageLike],
    *,
    tools: list[dict[str, Any]] | None = None,
    think: bool | str | None = None,
    format: str | dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    keep_alive: float | str | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """One assistant turn after ``messages`` (the whole history, oldest first)."""
    return client.submit(
        NAME,
        {
            "model": model,
            "messages": client.prepare_messages(messages),
            "tools": tools,
            "think": think,
            "format": format,
            "options": options,
            "keep_alive": keep_alive,
        },
        **submit,
    )


def submit_from_cli(
    client: Submitter[JobT],
    sdk: SdkOptions,
    *,
    model: str,
    message: str,
    system: str | None,
    history: Path | None,
    think: bool | None,
) -> JobT:
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    if history:
        messages += load_history(history)
    messages.append({"role": "user", "content": message})
    return chat(client, model, messages, think=think, **sdk)


def load_history(path: Path) -> list[Any]:
    """The earlier messages for ``--history``: a JSON file holding an array of messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"--history: cannot read {path}: {exc}", field="--history") from exc
    limit = load_settings().max_json_depth
    messages = parse_json(text, what=f"--history {path}", field="--history", max_depth=limit)
    if not isinstance(messages, list):
        raise InvalidRequest(
            f"--history {path} must hold a JSON array of messages, e.g. "
            '[{"role": "user", "content": "hi"}]',
            field="--history",
        )
    return messages


KIND = TaskKind(
    name=NAME,
    summary="One assistant turn after a conversation, as Ollama's /api/chat.",
    payload=ChatPayload,
    result=ChatResult,
    run=run_chat,
    sdk=chat,
    cli=CliCommand(
        help="Send MESSAGE (after --history) to MODEL and get the assistant's turn.",
        params=[
            click.Argument(["model"]),
            TextArgument("message"),
            click.Option(["--system"], help="System prompt."),
            click.Option(
                ["--history"],
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                help="JSON file with the earlier messages [{role, content}, ...].",
            ),
            click.Option(
                ["--think/--no-think"], default=None, help="Ask a thinking model to think."
            ),
        ],
        submit=submit_from_cli,
    ),
)
