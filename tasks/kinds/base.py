"""What a task kind is, and the registry every other part derives its per-kind pieces from.

A :class:`TaskKind` names, once, its payload model, its result model, its runner, its SDK
method and its CLI subcommand. The Celery task (``corral.<name>``), the ``Client`` method,
``corral submit <name>``, the gateway's ``POST /v1/tasks/<name>`` and the payload's JSON Schema
in its OpenAPI document all follow from the registered kinds.

Nothing here imports the runtime parts (``workers``, ``requests``): the SDK imports the
registry, and a producer never loads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypedDict, TypeVar, Unpack

import click
from pydantic import BaseModel

from tasks.errors import InvalidRequest
from tasks.keys import task_name
from tasks.payloads import BasePayload
from tasks.results import TaskResult

if TYPE_CHECKING:
    from tasks.execution import Execution

P = TypeVar("P", bound=BasePayload)
R = TypeVar("R", bound=TaskResult)
JobT = TypeVar("JobT")
JobT_co = TypeVar("JobT_co", covariant=True)

MessageLike = dict[str, Any] | BaseModel
ImageInput = str | bytes | bytearray | Path  # a path, raw bytes, or base64 text
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # a Python name, a URL segment, a task name


class SubmitOptions(TypedDict, total=False):
    """The submission keywords every kind's SDK method takes (``**submit: Unpack[SubmitOptions]``)
    and passes on unchanged to ``Client.submit``, which says what each means. One left out takes
    ``Client.submit``'s default (``priority`` 5, the others none).
    """

    idempotency_key: str | None
    deadline_s: float | None
    priority: int
    tenant: str | None
    callback_url: str | None


class Submitter(Protocol[JobT_co]):
    """What a kind's SDK method needs from ``producers.Client`` (which it becomes a method of)."""

    def submit(
        self,
        kind: str,
        data: dict[str, Any],
        *,
        schema_model: type[BaseModel] | None = None,
        **submit: Unpack[SubmitOptions],
    ) -> JobT_co: ...

    def prepare_images(
        self, images: Iterable[ImageInput], field: str = "images"
    ) -> list[dict[str, Any]]: ...

    def prepare_messages(self, messages: Sequence[MessageLike]) -> list[dict[str, Any]]: ...


class SdkOptions(SubmitOptions):
    """The SDK keywords every ``corral submit`` subcommand passes on (from its shared options):
    the :class:`SubmitOptions`, and the Ollama ``options`` and ``keep_alive`` every kind takes.
    """

    options: dict[str, Any] | None
    keep_alive: float | str | None


@dataclass(frozen=True)
class CliCommand:
    """A kind's ``corral submit <name>`` subcommand: its own arguments and options, and the call.

    The CLI adds the options every kind shares (``--stream``, ``--wait``, ``-o``...), and for
    a prompt or message declared as a ``cli_input.TextArgument``, its ``--<name>-file``
    option; ``submit`` gets that text already read. ``submit`` is called with the SDK client,
    the :class:`SdkOptions`, then this command's own values as keywords, and returns the
    submitted job.
    """

    help: str
    params: Sequence[click.Parameter]
    submit: Callable[..., Any]


@dataclass(frozen=True)
class TaskKind(Generic[P, R]):
    """One kind of work: everything the rest of the project derives per kind."""

    name: str
    summary: str  # one line, for the API documentation
    payload: type[P]
    result: type[R]
    run: Callable[[Execution, P], R]  # in the worker: build the request, stream it, shape R
    sdk: Callable[..., Any]  # becomes ``Client.<name>``; its first parameter is the client
    cli: CliCommand
    # How many units of work a task brings (an embed task: its inputs), for a kind whose running
    # tasks serve pending ones in their own calls (tasks/take_along.py); None: one task, one slot.
    units: Callable[[P], int] | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"kind name {self.name!r} must match {_NAME.pattern}")
        field = self.result.model_fields.get("kind")
        if field is None or field.default != self.name:
            raise ValueError(f"{self.result.__name__}.kind must default to {self.name!r}")

    @property
    def task_name(self) -> str:
        """The Celery task that runs this kind."""
        return task_name(self.name)


class Registry:
    """The registered kinds by name. ``methods`` is the class that holds the SDK's methods."""

    def __init__(self, methods: type) -> None:
        self._kinds: dict[str, TaskKind[Any, Any]] = {}
        self._methods = methods

    def register(self, kind: TaskKind[Any, Any]) -> TaskKind[Any, Any]:
        """Add ``kind``; its Celery task, SDK method, CLI subcommand and route follow from it."""
        if kind.name in self._kinds:
            raise ValueError(f"a kind named {kind.name!r} is registered already")
        current = self._methods.__dict__.get(kind.name, kind.sdk)
        if current is not kind.sdk:
            raise ValueError(f"{self._methods.__name__}.{kind.name} is another function")
        self._kinds[kind.name] = kind
        setattr(self._methods, kind.name, kind.sdk)
        return kind

    def unregister(self, name: str) -> None:
        """Remove a kind registered with :meth:`register` (tests use it to clean up)."""
        self._kinds.pop(name)
        delattr(self._methods, name)

    def get(self, name: str) -> TaskKind[Any, Any]:
        """The kind called ``name``, or :class:`InvalidRequest` listing the known kinds."""
        kind = self._kinds.get(name)
        if kind is None:
            raise InvalidRequest(
                f"unknown task kind {name!r}; expected one of {', '.join(self._kinds)}"
            )
        return kind

    def find(self, name: str) -> TaskKind[Any, Any] | None:
        return self._kinds.get(name)

    def by_task_name(self, name: str) -> TaskKind[Any, Any] | None:
        """The kind whose Celery task is called ``name`` (None for any other task)."""
        return next((kind for kind in self._kinds.values() if kind.task_name == name), None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def __iter__(self) -> Iterator[TaskKind[Any, Any]]:
        return iter(list(self._kinds.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def __len__(self) -> int:
        return len(self._kinds)
