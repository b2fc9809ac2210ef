"""``structured``: JSON that must validate against a JSON Schema, corrected once if it does not."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Unpack

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from tasks.errors import InvalidRequest, StructuredOutputError
from tasks.kinds.base import (
    CliCommand,
    JobT,
    MessageLike,
    SdkOptions,
    SubmitOptions,
    Submitter,
    TaskKind,
)
from tasks.kinds.cli_input import TextArgument, json_argument
from tasks.kinds.runner import request_body, result_fields
from tasks.payloads import PromptOrMessages, check_schema
from tasks.results import TaskResult
from tasks.untrusted import too_deep

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator

    from tasks.execution import Execution

NAME = "structured"


class StructuredPayload(PromptOrMessages):
    """JSON output that must validate against ``schema``."""

    schema_: dict[str, Any] = Field(alias="schema")
    think: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value: Any, info: ValidationInfo) -> dict[str, Any]:
        return check_schema(value, info)


class StructuredResult(TaskResult):
    kind: Literal["structured"] = "structured"
    data: Any = None  # the validated JSON document (``null`` when the schema allows it)
    raw_text: str


def schema_instruction(schema: dict[str, Any]) -> str:
    return "\n\nRespond with JSON only, no prose, matching this JSON Schema:\n" + json.dumps(
        schema, separators=(",", ":")
    )


def run_structured(run: Execution, payload: StructuredPayload) -> StructuredResult:
    """Ask with the schema as ``format`` and in the prompt; validate; correct once."""
    schema = payload.schema_
    messages = payload.as_messages()
    last_user = max(i for i, m in enumerate(messages) if m.role in ("user", "system"))
    messages[last_user] = messages[last_user].model_copy(
        update={"content": messages[last_user].content + schema_instruction(schema)}
    )
    body = request_body(payload)
    body["format"] = schema
    if payload.think is not None:
        body["think"] = payload.think
    from jsonschema import Draft202012Validator  # 3 MiB that only structured tasks need

    validator = Draft202012Validator(schema)
    conversation = run.messages_json(messages)
    for round_number in (1, 2):
        body["messages"] = conversation
        reply = run.with_attempts(lambda: run.stream("/api/chat", dict(body)))
        problem = _schema_problem(reply.text, validator, run.settings.max_json_depth)
        if problem is None:
            return StructuredResult(
                **result_fields(run, payload, reply),
                data=json.loads(reply.text),
                raw_text=reply.text,
            )
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
            {
                "role": "user",
                "content": f"That reply is invalid: {problem}. Reply again with "
                "only the JSON document, matching the schema.",
            },
        ]
    raise AssertionError("unreachable")  # pragma: no cover


def _schema_problem(text: str, validator: Draft202012Validator, max_depth: int) -> str | None:
    """What is wrong with a reply, or None. The reply is untrusted: it may nest deeper than
    Python's parser, or the validator (both recursive), can follow."""
    try:
        data = json.loads(text)
    except RecursionError:
        return f"it nests deeper than {max_depth} levels"
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    if too_deep(data, max_depth) is not None:
        return f"it nests deeper than {max_depth} levels"
    error = next(iter(validator.iter_errors(data)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"at {where}: {error.message}"


def structured(
    client: Submitter[JobT],
    model: str,
    schema: dict[str, Any] | type[BaseModel],
    *,
    prompt: str | None = None,
    messages: Sequence[MessageLike] | None = None,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    keep_alive: float | str | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """JSON validated against ``schema`` (a JSON Schema, or a pydantic model class).

    With a pydantic class, ``job.result().data`` is an instance of it.
    """
    schema_model = schema if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    json_schema = schema_model.model_json_schema() if schema_model else schema
    return client.submit(
        NAME,
        {
            "model": model,
            "schema": json_schema,
            "prompt": prompt,
            "system": system,
            "messages": client.prepare_messages(messages) if messages is not None else None,
            "options": options,
            "keep_alive": keep_alive,
        },
        schema_model=schema_model,
        **submit,
    )


def submit_from_cli(
    client: Submitter[JobT],
    sdk: SdkOptions,
    *,
    model: str,
    prompt: str,
    schema: str,
    system: str | None,
) -> JobT:
    parsed = json_argument(schema, "--schema")
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            '--schema: a JSON Schema must be an object, e.g. {"type": "object"}', field="--schema"
        )
    return structured(client, model, parsed, prompt=prompt, system=system, **sdk)


KIND = TaskKind(
    name=NAME,
    summary="JSON that validates against a JSON Schema (corrected once if it does not).",
    payload=StructuredPayload,
    result=StructuredResult,
    run=run_structured,
    sdk=structured,
    cli=CliCommand(
        help="Ask MODEL for JSON matching --schema; the result is validated data.",
        params=[
            click.Argument(["model"]),
            TextArgument("prompt"),
            click.Option(
                ["--schema"], required=True, help="JSON Schema: a file path or JSON text."
            ),
            click.Option(["--system"], help="System prompt."),
        ],
        submit=submit_from_cli,
    ),
)
