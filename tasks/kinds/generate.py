"""``generate``: plain completion of a prompt, as Ollama's ``/api/generate``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Unpack

import click
from pydantic import Field, ValidationInfo, field_validator, model_validator

from tasks.kinds.base import CliCommand, JobT, SdkOptions, SubmitOptions, Submitter, TaskKind
from tasks.kinds.cli_input import TextArgument, json_argument
from tasks.kinds.runner import request_body, result_fields
from tasks.payloads import BasePayload, check_prompt, check_schema
from tasks.results import TaskResult

if TYPE_CHECKING:
    from tasks.execution import Execution

NAME = "generate"
MAX_CONTEXT_TOKENS = 262_144  # the largest num_ctx Ollama picks by itself


class GeneratePayload(BasePayload):
    """Plain completion, as ``/api/generate``."""

    prompt: str
    system: str | None = None
    format: Literal["json"] | dict[str, Any] | None = None
    raw: bool = False
    think: bool | Literal["low", "medium", "high"] | None = None
    # Ollama's deprecated conversational memory: the ``context`` of an earlier reply.
    context: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_CONTEXT_TOKENS)

    _prompt = field_validator("prompt")(check_prompt)

    @field_validator("format")
    @classmethod
    def _format(cls, value: Any, info: ValidationInfo) -> Any:
        return check_schema(value, info) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _raw_rules(self) -> GeneratePayload:
        if self.raw and self.system:
            raise ValueError("raw mode does not support a system prompt")
        if self.raw and self.context:
            raise ValueError("raw mode does not support context")
        return self


class GenerateResult(TaskResult):
    kind: Literal["generate"] = "generate"
    text: str
    thinking: str | None = None
    context: list[int] | None = None  # Ollama's token ids, to pass back as ``context``


def run_generate(run: Execution, payload: GeneratePayload) -> GenerateResult:
    body = request_body(payload)
    body["prompt"] = payload.prompt
    for name in ("system", "format", "think", "context"):
        if getattr(payload, name) is not None:
            body[name] = getattr(payload, name)
    if payload.raw:
        body["raw"] = True
    reply = run.with_attempts(lambda: run.stream("/api/generate", body))
    return GenerateResult(
        **result_fields(run, payload, reply),
        text=reply.text,
        thinking=reply.thinking or None,
        context=reply.final.get("context") or None,
    )


def generate(
    client: Submitter[JobT],
    model: str,
    prompt: str,
    *,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    keep_alive: float | str | None = None,
    format: str | dict[str, Any] | None = None,
    raw: bool = False,
    think: bool | str | None = None,
    context: list[int] | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """Plain completion of ``prompt`` (Ollama ``/api/generate``); ``context`` is an earlier
    result's ``context`` (Ollama's deprecated memory; prefer :meth:`chat`)."""
    return client.submit(
        NAME,
        {
            "model": model,
            "prompt": prompt,
            "system": system,
            "options": options,
            "keep_alive": keep_alive,
            "format": format,
            "raw": raw or None,
            "think": think,
            "context": context,
        },
        **submit,
    )


def submit_from_cli(
    client: Submitter[JobT],
    sdk: SdkOptions,
    *,
    model: str,
    prompt: str,
    system: str | None,
    format_: str | None,
    raw: bool,
) -> JobT:
    parsed = json_argument(format_, "--format")
    return generate(client, model, prompt, system=system, format=parsed, raw=raw, **sdk)


KIND = TaskKind(
    name=NAME,
    summary="Complete a prompt, as Ollama's /api/generate.",
    payload=GeneratePayload,
    result=GenerateResult,
    run=run_generate,
    sdk=generate,
    cli=CliCommand(
        help="Complete PROMPT with MODEL.",
        params=[
            click.Argument(["model"]),
            TextArgument("prompt"),
            click.Option(["--system"], help="System prompt."),
            click.Option(["--format", "format_"], help="'json', or a JSON Schema file or text."),
            click.Option(
                ["--raw"], is_flag=True, help="Send the prompt without the model's template."
            ),
        ],
        submit=submit_from_cli,
    ),
)
