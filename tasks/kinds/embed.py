"""``embed``: one vector per input text, as Ollama's ``/api/embed``.

An embed task streams no tokens: its events are ``start``, then ``done`` (or ``error``). In the
worker its inputs do not get a call of their own: the process's :class:`~workers.batcher.Batcher`
gathers the waiting embed tasks of a model into ``/api/embed`` calls of up to
``CORRAL_EMBED_BATCH_MAX_INPUTS`` inputs (a larger task is split), and hands each task its own
vectors; before its first call, a running embed task also takes the pending embed tasks of its
model that fit along into its calls (:mod:`tasks.take_along`). Each task keeps its own lease,
result and terminal event (docs/decisions.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Unpack

import click
from pydantic import AfterValidator, Field, ValidationInfo, computed_field, field_validator

from tasks.errors import CorralError, InvalidRequest, RetryableError, TaskCancelled, TaskTimeout
from tasks.kinds.base import CliCommand, JobT, SdkOptions, SubmitOptions, Submitter, TaskKind
from tasks.kinds.cli_input import STDIN, read_stdin, read_text
from tasks.kinds.runner import request_body
from tasks.payloads import BasePayload, Options, limits_of
from tasks.results import OllamaMetrics, TaskResult

if TYPE_CHECKING:
    from tasks.execution import Execution
    from tasks.take_along import Rider
    from workers.batcher import Share, Work
    from workers.ollama_client import OllamaClient

NAME = "embed"
STOP_POLL_S = 5.0  # the longest a task waiting for its batch goes without a check
PATH = "/api/embed"
# Ollama's runner options: how a model is loaded and run. The rest of Options steer sampling
# and generation, which an embedding model does not do.
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap")
GENERATION_OPTIONS = tuple(name for name in Options.model_fields if name not in RUNNER_OPTIONS)


class EmbedOptions(Options):
    """The options an embed task takes: the runner's only; a generation option is refused."""

    @field_validator(*GENERATION_OPTIONS, mode="before")
    @classmethod
    def _not_for_embeddings(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError(
                "embedding models take no generation options; remove it (embed takes only "
                f"{', '.join(RUNNER_OPTIONS)})"
            )
        return value


def _check_text(value: str, info: ValidationInfo) -> str:
    limit = limits_of(info).max_prompt_chars
    if len(value) > limit:
        raise ValueError(f"text of {len(value):,} characters exceeds {limit:,}")
    if not value.strip():
        raise ValueError("text must not be empty")
    return value


class EmbedPayload(BasePayload):
    """Texts to embed, as ``/api/embed``: one string or a list, kept as a list."""

    input: list[Annotated[str, AfterValidator(_check_text)]]
    truncate: bool = True  # False: an input longer than the context is an error, not cut
    dimensions: int | None = Field(None, gt=0)  # shorten each vector (models that support it)
    options: EmbedOptions | None = None  # narrower than Options

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("input")
    @classmethod
    def _count(cls, value: list[str], info: ValidationInfo) -> list[str]:
        limit = limits_of(info).max_embed_inputs
        if not value:
            raise ValueError("give at least one text to embed")
        if len(value) > limit:
            raise ValueError(
                f"{len(value):,} inputs exceed the limit of {limit:,} per task "
                "(CORRAL_MAX_EMBED_INPUTS); split them over several tasks"
            )
        return value


class EmbedResult(TaskResult):
    kind: Literal["embed"] = "embed"
    embeddings: list[list[float]]  # one vector per input, in input order

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented form
    @property
    def prompt_eval_count(self) -> int | None:
        """Input tokens evaluated for this task (its share, when it shared a call)."""
        return self.metrics.prompt_eval_count


@dataclass(eq=False)
class _Owner:
    """A task whose inputs go into the calls: the running task, or one it took along."""

    work: Work[str, list[float]]
    parts: list[list[str]]  # its inputs, in parts of at most a call's size
    rider: Rider | None = None  # None: the running task itself
    shares: dict[int, Share[str, list[float]]] = field(default_factory=dict)
    error: CorralError | None = None  # how it failed, if it did

    @property
    def missing(self) -> list[int]:
        return [i for i in range(len(self.parts)) if i not in self.shares]

    @property
    def settled(self) -> bool:
        ended = self.rider is not None and self.rider.ended
        return ended or self.error is not None or not self.missing

    def result(self, run: Execution, task_id: str, model: str) -> EmbedResult:
        ordered = [self.shares[i] for i in range(len(self.parts))]
        return EmbedResult(
            task_id=task_id,
            model=model,
            embeddings=[vector for share in ordered for vector in share.results],
            metrics=_metrics(ordered),
            attempts=run.attempts,
        )


def run_embed(run: Execution, payload: EmbedPayload) -> EmbedResult:
    """Hand the inputs to the process's batcher (in parts of at most its batch size) and wait.

    Before that, the pending embed tasks of the model that fit in the first call are taken along
    (tasks/take_along.py): their inputs go into this task's calls, and each ends with its own
    result. A failed part is sent again on the next attempt; the parts already embedded are
    kept. If this task stops (cancelled, past its deadline) or fails on its own, the tasks taken
    along that are not finished go back to their queue.
    """
    size = run.batcher.max_items
    lead = _Owner(_work(run, payload), _split(payload.input, size))
    # Sleep until a call returns, a cancel fires or the deadline passes: hundreds of tasks
    # wait on one call, and a poll each would cost the process thousands of wake-ups.
    wake, left_s = run.stop_signal()
    riders: list[Rider] = []
    if run.take_along is not None:
        riders = run.take_along.take(KIND, payload.model, size - len(payload.input), wake)
    owners = [
        lead,
        *(_Owner(_work(run, r.payload), _split(r.payload.input, size), r) for r in riders),
    ]
    poll_s = min([STOP_POLL_S, left_s, *(r.deadline - time.time() for r in riders)])

    def check() -> None:
        stopped: list[tuple[Rider, dict[str, Any] | CorralError]] = []
        for owner in owners[1:]:
            stop = None if owner.settled else _stop_of(owner.rider)
            if owner.rider is not None and stop is not None:
                stopped.append((owner.rider, stop))
        _end_riders(run, stopped)
        run.check()

    def attempt() -> None:
        asks = [(owner, i) for owner in owners if not owner.settled for i in owner.missing]
        parts = [(owner.work, owner.parts[i]) for owner, i in asks]
        outcomes = run.batcher.gather_each(parts, check, wake=wake, poll_s=max(0.0, poll_s) + 0.01)
        retry: BaseException | None = None
        for (owner, i), outcome in zip(asks, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                owner.shares[i] = outcome
            elif getattr(outcome, "retryable", False):
                retry = retry or outcome
            elif owner.error is None:
                owner.error = _own_copy(outcome)
        if lead.error is not None:
            raise lead.error
        if retry is not None:
            raise _own_copy(retry) from retry

    try:
        run.with_attempts(attempt)
    except RetryableError as exc:  # the attempts are spent: what is still missing fails so
        for owner in owners:
            if not owner.settled:
                owner.error = _own_copy(exc)
    except BaseException:
        _settle_riders(run, payload.model, owners[1:])
        raise
    _settle_riders(run, payload.model, owners[1:])
    if lead.error is not None:
        raise lead.error
    return lead.result(run, run.task_id, payload.model)


def _work(run: Execution, payload: EmbedPayload) -> Work[str, list[float]]:
    """How a task's inputs are sent: tasks whose calls would be the same share them."""
    from workers.batcher import Work  # the worker's side only: producers never load workers

    body = request_body(payload)
    if not payload.truncate:
        body["truncate"] = False
    if payload.dimensions is not None:
        body["dimensions"] = payload.dimensions
    return Work(
        lane=payload.model,
        key=json.dumps(body, sort_keys=True),
        send=lambda inputs: _call(run.ollama, body, inputs),
        isolate=lambda exc: isinstance(exc, InvalidRequest),  # e.g. one input too long
    )


def _split(inputs: list[str], size: int) -> list[list[str]]:
    return [inputs[i : i + size] for i in range(0, len(inputs), size)]


def _stop_of(rider: Rider | None) -> CorralError | None:
    """Why a task taken along must stop now: cancelled, or past its deadline."""
    if rider is None:
        return None
    if rider.cancel_requested:
        return TaskCancelled("cancelled while running", task_id=rider.task_id)
    if time.time() > rider.deadline:
        return TaskTimeout("the task's deadline passed while embedding", task_id=rider.task_id)
    return None


def _end_riders(run: Execution, outcomes: list[tuple[Rider, dict[str, Any] | CorralError]]) -> None:
    if outcomes and run.take_along is not None:
        run.take_along.end(KIND, outcomes)


def _settle_riders(run: Execution, model: str, owners: list[_Owner]) -> None:
    """End the tasks taken along that have their vectors or their error; give the others
    back to their queue."""
    take_along = run.take_along
    if take_along is None or not owners:
        return
    outcomes: list[tuple[Rider, dict[str, Any] | CorralError]] = []
    left = []
    for owner in owners:
        rider = owner.rider
        if rider is None or rider.ended:
            continue
        if owner.error is not None:
            outcomes.append((rider, owner.error.with_info(attempts=run.attempts)))
        elif not owner.missing:
            result = owner.result(run, rider.task_id, model)
            rider.timings.finished_at = time.time()
            result.timings = rider.timings
            result.worker = take_along.worker
            result.ollama_host = take_along.host
            outcomes.append((rider, result.model_dump(mode="json", exclude_none=True)))
        else:
            left.append(rider)
    take_along.end(KIND, outcomes)
    take_along.give_back_riders(left)


def _call(ollama: OllamaClient, body: dict[str, Any], inputs: list[str]) -> tuple[list[Any], Any]:
    """One ``/api/embed`` call for a whole batch: its vectors, and Ollama's figures."""
    from tasks.ollama_boundary import ollama_errors  # loads workers: the worker's side only

    with ollama_errors():
        reply = ollama.post_json(PATH, {**body, "input": inputs})
    vectors = reply.get("embeddings")
    if not isinstance(vectors, list) or len(vectors) != len(inputs):
        count = len(vectors) if isinstance(vectors, list) else "no"
        raise CorralError(
            f"Ollama answered {count} embeddings for {len(inputs)} inputs", model=body["model"]
        )
    return vectors, reply


def _own_copy(error: BaseException) -> CorralError:
    """A batch's failure reaches every task of the batch: each raises (and annotates) its own."""
    if isinstance(error, CorralError):
        return type(error)(error.message, dict(error.info))
    return CorralError(f"internal error in the embedding batch: {error!r}")


def _metrics(shares: list[Share[str, list[float]]]) -> OllamaMetrics:
    """Ollama's figures for a task: the durations of the calls its vectors came from, and its
    share of their input tokens. Ollama counts tokens per call, not per input, so a call's count
    is shared out in proportion to the inputs' lengths (exact for a task that had the call to
    itself; the shares of one call add up to its count)."""
    total = load = tokens = 0
    for share in shares:
        reply = share.batch.info
        total += int(reply.get("total_duration") or 0)
        load += int(reply.get("load_duration") or 0)
        tokens += _token_share(share, int(reply.get("prompt_eval_count") or 0))
    return OllamaMetrics(
        total_duration=total or None, load_duration=load or None, prompt_eval_count=tokens or None
    )


def _token_share(share: Share[str, list[float]], count: int) -> int:
    lengths = [len(text) + 1 for text in share.batch.items]
    whole = sum(lengths)
    before = sum(lengths[: share.start])
    mine = sum(lengths[share.start : share.end])
    return round(count * (before + mine) / whole) - round(count * before / whole)


def embed(
    client: Submitter[JobT],
    model: str,
    input: str | list[str],
    *,
    truncate: bool = True,
    dimensions: int | None = None,
    keep_alive: float | str | None = None,
    options: dict[str, Any] | None = None,
    **submit: Unpack[SubmitOptions],
) -> JobT:
    """Vectors for ``input`` (one text or a list), in input order (Ollama ``/api/embed``).

    ``job.result().embeddings`` holds one vector per input; ``truncate=False`` makes an input
    longer than the model's context an error instead of cutting it; ``dimensions`` shortens the
    vectors (models that support it). ``options`` takes the runner's options only (``num_ctx``
    ...): an embedding model takes no generation options.
    """
    return client.submit(
        NAME,
        {
            "model": model,
            "input": input,
            "truncate": truncate,
            "dimensions": dimensions,
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
    texts: tuple[str, ...],
    file: str | None,
    truncate: bool,
    dimensions: int | None,
) -> JobT:
    inputs = [*texts, *(read_inputs(file) if file is not None else [])]
    if not inputs:
        raise InvalidRequest(
            "no input: give TEXT arguments, or --file with one input per line", field="input"
        )
    return embed(client, model, inputs, truncate=truncate, dimensions=dimensions, **sdk)


def read_inputs(path: str) -> list[str]:
    """The inputs of ``--file``: one per line, blank lines skipped (``-``: standard input)."""
    if path == STDIN:
        text = read_stdin("--file")
    else:
        hint = "give the path of a UTF-8 text file with one input per line, or '-' for stdin"
        text = read_text(path, "--file", hint)
    return [line for line in text.splitlines() if line.strip()]


KIND = TaskKind(
    name=NAME,
    summary="One vector per input text, as Ollama's /api/embed (gathered into shared calls).",
    payload=EmbedPayload,
    result=EmbedResult,
    run=run_embed,
    sdk=embed,
    units=lambda payload: len(payload.input),
    cli=CliCommand(
        help="Embed each TEXT (and each line of --file) with MODEL; the result holds one "
        "vector per input, in order.",
        params=[
            click.Argument(["model"]),
            click.Argument(["texts"], nargs=-1),
            click.Option(
                ["--file", "file"],
                type=click.Path(dir_okay=False, allow_dash=True),
                help="A text file with one input per line ('-': standard input).",
            ),
            click.Option(
                ["--truncate/--no-truncate"],
                default=True,
                show_default=True,
                help="Cut inputs longer than the model's context (else they are an error).",
            ),
            click.Option(
                ["--dimensions"],
                type=click.IntRange(min=1),
                help="Shorten each vector to this size.",
            ),
        ],
        submit=submit_from_cli,
    ),
)
