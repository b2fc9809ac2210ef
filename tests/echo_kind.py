"""A task kind that exists only for the tests: ``echo`` sends a text back without calling Ollama.

It is written the way a new kind is added to ``tasks/kinds/``: one module, then registration.
Run as a script, it is ``corral`` with this kind registered (``python tests/echo_kind.py worker
...`` or ``... submit echo ...``), so that a worker and the CLI know it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Unpack

import click

from tasks.kinds.base import CliCommand, JobT, SdkOptions, SubmitOptions, Submitter, TaskKind
from tasks.payloads import BasePayload
from tasks.results import TaskResult

if TYPE_CHECKING:
    from tasks.execution import Execution

NAME = "echo"


class EchoPayload(BasePayload):
    """A text to send back."""

    text: str


class EchoResult(TaskResult):
    kind: Literal["echo"] = "echo"
    text: str


def run_echo(run: Execution, payload: EchoPayload) -> EchoResult:
    run.publisher.emit("token", text=payload.text)
    return EchoResult(
        task_id=run.task_id, model=payload.model, text=payload.text, attempts=run.attempts
    )


def echo(
    client: Submitter[JobT],
    model: str,
    text: str,
    *,
    options: dict[str, Any] | None = None,
    keep_alive: float | str | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """Have a worker of ``model`` send ``text`` back."""
    return client.submit(
        NAME,
        {"model": model, "text": text, "options": options, "keep_alive": keep_alive},
        **submit,
    )


def echo_from_cli(client: Submitter[JobT], sdk: SdkOptions, *, model: str, text: str) -> JobT:
    return echo(client, model, text, **sdk)


KIND = TaskKind(
    name=NAME,
    summary="Send a text back (a kind of the tests).",
    payload=EchoPayload,
    result=EchoResult,
    run=run_echo,
    sdk=echo,
    cli=CliCommand(
        help="Have a worker of MODEL send TEXT back.",
        params=[click.Argument(["model"]), click.Argument(["text"])],
        submit=echo_from_cli,
    ),
)

if __name__ == "__main__":
    from producers.cli.main import main
    from tasks.kinds import registry

    registry.register(KIND)
    main()
