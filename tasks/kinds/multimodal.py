"""``multimodal``: images with text, as Ollama's ``/api/chat`` with ``images``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Unpack

import click
from pydantic import Field, ValidationInfo, field_validator, model_validator

from tasks.kinds.base import (
    CliCommand,
    ImageInput,
    JobT,
    MessageLike,
    SdkOptions,
    SubmitOptions,
    Submitter,
    TaskKind,
)
from tasks.kinds.cli_input import TextArgument, read_bytes
from tasks.kinds.runner import request_body, result_fields
from tasks.payloads import ImagePart, PromptOrMessages, check_image_list
from tasks.results import TaskResult

if TYPE_CHECKING:
    from tasks.execution import Execution

NAME = "multimodal"


class MultimodalPayload(PromptOrMessages):
    """Images with text. With ``prompt``, the images go with it; with ``messages``, in them."""

    images: list[ImagePart | str] = Field(default_factory=list)

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            return check_image_list(value, info, "images")
        return value

    @model_validator(mode="after")
    def _has_images(self) -> MultimodalPayload:
        in_messages = any(m.images for m in self.messages or [])
        if not self.images and not in_messages:
            raise ValueError("a multimodal task needs at least one image")
        if self.messages is not None and self.images:
            raise ValueError("with 'messages', put the images inside the messages")
        return self


class MultimodalResult(TaskResult):
    kind: Literal["multimodal"] = "multimodal"
    text: str


def run_multimodal(run: Execution, payload: MultimodalPayload) -> MultimodalResult:
    messages = payload.as_messages()
    if payload.images:
        messages[-1] = messages[-1].model_copy(update={"images": list(payload.images)})
    body = request_body(payload)
    body["messages"] = run.messages_json(messages)
    reply = run.with_attempts(lambda: run.stream("/api/chat", body))
    return MultimodalResult(**result_fields(run, payload, reply), text=reply.text)


def multimodal(
    client: Submitter[JobT],
    model: str,
    prompt: str | None = None,
    images: Iterable[ImageInput] = (),
    *,
    messages: Sequence[MessageLike] | None = None,
    system: str | None = None,
    options: dict[str, Any] | None = None,
    keep_alive: float | str | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """Ask about images, given as paths, bytes or base64 (large ones travel by reference)."""
    parts = client.prepare_images(images)
    return client.submit(
        NAME,
        {
            "model": model,
            "prompt": prompt,
            "images": parts,
            "system": system,
            "messages": client.prepare_messages(messages) if messages is not None else None,
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
    prompt: str,
    images: tuple[Path, ...],
) -> JobT:
    hint = "give the path of an existing image file"
    return multimodal(
        client, model, prompt, [read_bytes(p, "--image", hint) for p in images], **sdk
    )


KIND = TaskKind(
    name=NAME,
    summary="Ask about images with text, as Ollama's /api/chat with images.",
    payload=MultimodalPayload,
    result=MultimodalResult,
    run=run_multimodal,
    sdk=multimodal,
    cli=CliCommand(
        help="Ask MODEL about one or more images.",
        params=[
            click.Argument(["model"]),
            TextArgument("prompt"),
            click.Option(
                ["--image", "images"],
                multiple=True,
                required=True,
                type=click.Path(path_type=Path),
                help="Image file (repeatable).",
            ),
        ],
        submit=submit_from_cli,
    ),
)
