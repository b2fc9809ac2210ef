"""The ``corral`` command line."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import click

from producers.cli.redis_bootstrap import ensure_redis
from producers.cli.render import (
    DIM,
    by_priority,
    dump_json,
    handle_errors,
    print_events,
    print_queued,
    raise_for_terminal,
    styled,
    table,
)
from producers.client import Client
from producers.jobs import Job
from producers.unserved import UnservedModelWarning, unserved_notice
from tasks.errors import InvalidRequest
from tasks.keys import canonical_model, model_of_queue, queue_name
from tasks.kinds import registry
from tasks.kinds.base import SdkOptions, TaskKind
from tasks.kinds.cli_input import TextArgument
from tasks.lifecycle import dead_letters, remove_dead_letter
from tasks.queues import (
    HostUse,
    QueueUse,
    host_overview,
    purge_model,
    queue_depths,
    queue_overview,
    scheduled_hosts,
)
from tasks.registry import live_workers
from tasks.scheduler import DEFAULT_PRIORITY, MAX_PRIORITY
from tasks.settings import Settings, load_settings


def settings_with_redis() -> Settings:
    settings = load_settings()
    ensure_redis(settings.redis_url)
    return settings


def client() -> Client:
    return Client(settings=settings_with_redis())


class LazyGroup(click.Group):
    """Imports a heavy subcommand only when it runs, so that a worker does not load FastAPI."""

    LAZY = {
        "gateway": "producers.gateway.commands:gateway",
        "keys": "producers.gateway.commands:keys",
        "status": "producers.cli.ops:status",
        "flower": "producers.cli.ops:flower",
        "exporter": "producers.cli.ops:exporter",
        "batch": "producers.cli.batch:batch",
        "webhooks": "producers.cli.webhooks:webhooks",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attr = self.LAZY[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ollama-corral")
def cli() -> None:
    """ollama-corral: queue LLM work for Ollama on Redis, run it on Celery workers per model."""


# -- running parts ------------------------------------------------------------------------
@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)  # --help goes to the simulator
@click.pass_context
def sim(ctx: click.Context) -> None:
    """Run the Ollama simulator (--host, --port, ...: `corral sim --help` lists them)."""
    sys.exit(subprocess.call([sys.executable, "-m", "ollama_sim", *ctx.args]))


@cli.command()
@click.option(
    "--model", "models", multiple=True, required=True, help="Model to serve (repeatable)."
)
@click.option(
    "--slots",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Concurrent tasks: set it to the Ollama host's OLLAMA_NUM_PARALLEL. For an embedding "
    "model, the embed tasks held at once to be gathered into shared calls, e.g. twice "
    "CORRAL_EMBED_BATCH_MAX_INPUTS (docs/operations.md).",
)
@click.option("--ollama-host", help="Ollama URL for this worker (default: OLLAMA_HOST).")
@click.option(
    "--pool", type=click.Choice(["threads", "prefork"]), default="threads", show_default=True
)
@click.option("--name", help="Node name (default: <models>@<hostname>).")
@click.option(
    "--loglevel",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--supervise/--no-supervise",
    default=True,
    show_default=True,
    help="Start the worker again if it dies without being asked to stop.",
)
@handle_errors
def worker(
    models: tuple[str, ...],
    slots: int,
    ollama_host: str | None,
    pool: str,
    name: str | None,
    loglevel: str,
    supervise: bool,
) -> None:
    """Start a Celery worker consuming the queues of MODELs."""
    from tasks.worker_app import app
    from workers.launcher import WorkerOptions, default_node_name, run_worker

    if ollama_host:
        os.environ["OLLAMA_HOST"] = ollama_host
    settings_with_redis()
    canonical = tuple(canonical_model(m) for m in models)
    node = name or default_node_name(canonical)
    if supervise:
        from workers import supervisor as supervisor_module

        child = [
            sys.executable,
            "-m",
            "producers.cli",
            "worker",
            "--no-supervise",
            "--slots",
            str(slots),
            "--pool",
            pool,
            "--name",
            node,
            "--loglevel",
            loglevel,
            *(arg for m in canonical for arg in ("--model", m)),
        ]
        # Run by path, not with -m, and without site: it needs only the standard library.
        supervisor = [sys.executable, "-S", supervisor_module.__file__, "--", *child]
        os.execv(sys.executable, supervisor)  # this process becomes the small supervisor
    options = WorkerOptions(
        queues=tuple(queue_name(m) for m in canonical),
        concurrency=slots,
        pool=pool,
        node_name=node,
        loglevel=loglevel,
    )
    sys.exit(run_worker(app, options))


# -- submitting ---------------------------------------------------------------------------
def shared_submit_params() -> list[click.Parameter]:
    """The options every ``corral submit <kind>`` takes after the kind's own."""
    return [
        click.Option(
            ["--idempotency-key"],
            help="Submitting the same key again returns the first task's id instead of enqueueing.",
        ),
        click.Option(
            ["--deadline-s"],
            type=click.FloatRange(min=0, min_open=True),
            help="Give up if not done this many seconds after submission.",
        ),
        click.Option(
            ["--priority"],
            type=click.IntRange(0, MAX_PRIORITY),
            default=DEFAULT_PRIORITY,
            show_default=True,
            help=f"0-{MAX_PRIORITY}: higher starts sooner; a waiting task gains one step per "
            "CORRAL_PRIORITY_AGING_S.",
        ),
        click.Option(
            ["--tenant"],
            help="Whose fair share of the model's slots this task uses (default: default).",
        ),
        click.Option(
            ["--callback-url"],
            help="POST the task's end here, signed with CORRAL_WEBHOOK_SECRET (README, "
            "'Webhooks').",
        ),
        click.Option(["--keep-alive"], help="Ollama keep_alive (seconds or '5m')."),
        click.Option(
            ["--option", "-o", "options"],
            multiple=True,
            metavar="KEY=VALUE",
            help="Ollama option, e.g. -o temperature=0.2 -o num_predict=64.",
        ),
        click.Option(["--wait"], is_flag=True, help="Wait and print the result as JSON."),
        click.Option(["--stream", "stream_"], is_flag=True, help="Print tokens as they come."),
    ]


def parse_options(pairs: tuple[str, ...]) -> dict[str, Any] | None:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequest(f"option {pair!r} is not KEY=VALUE", field="options")
        try:
            options[key] = json.loads(value)
        except (ValueError, RecursionError):  # not JSON: the text itself, checked as the option
            options[key] = value
    return options or None


def parse_keep_alive(value: str | None) -> float | str | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def submit_kwargs(common: dict[str, Any]) -> SdkOptions:
    """The SDK keywords from the options every submit command shares."""
    return {
        "options": parse_options(common["options"]),
        "keep_alive": parse_keep_alive(common["keep_alive"]),
        "idempotency_key": common["idempotency_key"],
        "deadline_s": common["deadline_s"],
        "priority": common["priority"],
        "tenant": common["tenant"],
        "callback_url": common["callback_url"],
    }


def warn_if_unserved(job: Job) -> bool:
    """Waiting on a queue no live worker consumes would look like a hang: say so up front."""
    notice = unserved_notice(job.client.redis, job.id)
    if notice is not None:
        click.echo(f"note: {notice}", err=True)
    return notice is not None


@contextlib.contextmanager
def unserved_notes(*, already_noted: bool = False) -> Iterator[None]:
    """A wait's :class:`UnservedModelWarning` as one ``note:`` line on stderr (or none, when
    the submission already said so)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if already_noted else "always", UnservedModelWarning)
        show = warnings.showwarning

        def note(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
            if issubclass(category, UnservedModelWarning):
                click.echo(f"note: {message}", err=True)
            else:
                show(message, category, *args, **kw)

        warnings.showwarning = note
        yield


def finish(job: Job, common: dict[str, Any]) -> None:
    """Print the id, or stream the text, or print the result as JSON.

    Streaming or waiting, the id goes to stderr first, so that stdout holds only the text or
    the JSON, and the task can still be followed up (``corral result``, ``corral cancel``).
    """
    stream_, wait = common["stream_"], common["wait"]
    if not (stream_ or wait):
        click.echo(job.id)
        return
    click.echo(styled(f"task {job.id}", DIM, sys.stderr), err=True)
    with unserved_notes(already_noted=warn_if_unserved(job)):
        if stream_:
            terminal = print_events(job.stream())
            result = raise_for_terminal(terminal)
            if wait:
                dump_json(result)
        else:
            print_queued(job.stream())
            dump_json(job.result().model_dump(mode="json", exclude_none=True))


class SubmitGroup(click.Group):
    """One subcommand per registered task kind (``tasks/kinds/``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *registry.names()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        kind = registry.find(name)
        return submit_command(kind) if kind is not None else super().get_command(ctx, name)


def submit_command(kind: TaskKind[Any, Any]) -> click.Command:
    """``corral submit <kind>``: the kind's own arguments and options, then the shared ones."""
    shared = shared_submit_params()
    shared_names = [param.name for param in shared]
    texts = [param for param in kind.cli.params if isinstance(param, TextArgument)]

    @handle_errors
    def submit_kind(**values: Any) -> None:
        common = {name: values.pop(name) for name in shared_names}
        for text in texts:  # the prompt or message: as given, from stdin ("-") or a file
            values[text.name] = text.resolve(values[text.name], values.pop(f"{text.name}_file"))
        job = kind.cli.submit(client(), submit_kwargs(common), **values)
        finish(job, common)

    params = [*kind.cli.params, *(text.file_option() for text in texts), *shared]
    epilog = " ".join(text.epilog() for text in texts) or None
    return click.Command(
        kind.name, params=params, callback=submit_kind, help=kind.cli.help, epilog=epilog
    )


@cli.group(cls=SubmitGroup)
def submit() -> None:
    """Submit a task; prints its id (or streams it with --stream, waits with --wait).

    Streaming or waiting, the id comes first on stderr (`task ID`); stdout holds only the text
    or the result's JSON.
    """


# -- following up -------------------------------------------------------------------------
@cli.command()
@click.argument("task_id")
@click.option("--timeout", type=float, help="Seconds to wait (default: forever).")
@handle_errors
def result(task_id: str, timeout: float | None) -> None:
    """Wait for TASK_ID and print its result as JSON (or its typed error)."""
    with unserved_notes():
        outcome = client().job(task_id).result(timeout=timeout)
    dump_json(outcome.model_dump(mode="json", exclude_none=True))


@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print each event as a JSON line.")
@handle_errors
def stream(task_id: str, as_json: bool) -> None:
    """Follow TASK_ID's events from the start, live until it ends."""
    events = client().job(task_id).stream()
    with unserved_notes():
        if as_json:
            terminal: dict[str, Any] = {}
            for event in events:
                click.echo(json.dumps(event, ensure_ascii=False))
                terminal = event
        else:
            terminal = print_events(events)
    raise_for_terminal(terminal)


@cli.command()
@click.argument("task_id")
@handle_errors
def cancel(task_id: str) -> None:
    """Cancel TASK_ID: queued, it never runs; running, it stops within one chunk."""
    state = client().job(task_id).cancel()
    messages = {
        "cancelled": "cancelled before it started; it will never run",
        "running": "cancel requested; the worker stops within one chunk",
    }
    message = f"already {state}; nothing to cancel" if state.ended else messages[state]
    click.echo(f"{task_id}: {message}")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def queues(ctx: click.Context, as_json: bool) -> None:
    """Each model queue with waiting tasks or a live worker: its backlog (WAITING: in Celery's
    queue plus PENDING, held by the scheduler, by aged priority), workers, slots; then the
    model each Ollama host is kept on and its model switches.

    An empty queue that no worker serves is not listed; `corral queues purge MODEL` removes a
    queue's waiting tasks (e.g. those sent to a mistyped model).
    """
    if ctx.invoked_subcommand is not None:
        return
    sdk = client()
    workers = live_workers(sdk.redis)
    rows = queue_overview(sdk.redis, workers, sdk.settings)
    if as_json:
        dump_json([asdict(row) for row in rows])
        return
    queue_table(rows)
    hosts = sorted({w.ollama_host for w in workers} | set(scheduled_hosts(sdk.redis)))
    if hosts:
        click.echo("")
        host_table(host_overview(sdk.redis, sdk.settings, hosts))


def queue_table(rows: list[QueueUse]) -> None:
    table(
        [
            "MODEL",
            "QUEUE",
            "WAITING",
            "PENDING",
            "BY PRIORITY",
            "OLDEST",
            "RUNNING",
            "WORKERS",
            "SLOTS",
        ],
        [
            (
                r.model,
                r.queue,
                r.waiting,
                r.pending,
                by_priority(r.by_priority),
                f"{r.oldest_wait_s:.0f}s" if r.pending else "-",
                r.running,
                r.workers,
                r.slots,
            )
            for r in rows
        ],
    )


def host_table(hosts: list[HostUse]) -> None:
    """What the scheduler keeps each Ollama host on, and how often it switched models."""
    now = time.time()
    table(
        ["OLLAMA HOST", "SERVING", "FOR", "MODEL SWITCHES"],
        [
            (h.host, h.model or "-", f"{now - h.since:.0f}s" if h.since else "-", h.switches)
            for h in hosts
        ],
    )


@queues.command("purge")
@click.argument("model")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.option("--force", is_flag=True, help="Purge even a queue that live workers serve.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def queues_purge(model: str, yes: bool, force: bool, as_json: bool) -> None:
    """Remove MODEL's waiting tasks and forget the model.

    Each removed task ends as cancelled ("queue purged"), so nobody waits on it forever.
    """
    sdk = client()
    queue = queue_name(model)
    serving = [w.node for w in live_workers(sdk.redis) if queue in w.queues]
    if serving and not force:
        raise InvalidRequest(
            f"live workers serve {queue} ({', '.join(serving)}): its tasks are "
            "real work; stop those workers first, or pass --force to drop "
            "its waiting tasks anyway",
            field="model",
        )
    waiting = queue_depths(sdk.redis, [queue])[0].waiting
    if waiting and not yes:
        click.confirm(
            f"remove the {waiting} waiting tasks of {queue}? They end as cancelled.",
            abort=True,
            err=True,
        )
    purged = purge_model(sdk.redis, sdk.backend, model, sdk.settings)
    if as_json:
        dump_json(
            {
                "model": model_of_queue(queue),
                "queue": queue,
                "messages": purged.messages,
                "cancelled": purged.ended,
            }
        )
        return
    click.echo(
        f"purged {queue}: {purged.messages} waiting messages removed, "
        f"{len(purged.ended)} tasks cancelled"
    )
    for task_id in purged.ended:
        click.echo(f"  {task_id}: cancelled (queue purged)")


@cli.group()
def dlq() -> None:
    """Dead letters: tasks that failed after exhausting their retries."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def dlq_list(as_json: bool) -> None:
    """List dead letters, oldest first."""
    records = dead_letters(client().redis)
    if as_json:
        dump_json(records)
        return
    table(
        ["TASK", "KIND", "MODEL", "ERROR", "FAILED AT"],
        [
            (
                r["task_id"],
                r.get("kind", "-"),  # a malformed message has none
                (r.get("payload") or {}).get("model", "?"),
                f"{r['error']['type']}: {r['error']['message'][:60]}",
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["failed_at"])),
            )
            for r in records
        ],
    )


@dlq.command("retry")
@click.argument("task_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Replay every dead letter.")
@handle_errors
def dlq_retry(task_ids: tuple[str, ...], retry_all: bool) -> None:
    """Submit dead letters again (as new tasks); prints old → new ids."""
    sdk = client()
    records = {r["task_id"]: r for r in dead_letters(sdk.redis)}
    # Malformed messages (tasks/malformed.py) are kept to be read, not run: --all skips them.
    chosen = [t for t, r in records.items() if "kind" in r] if retry_all else list(task_ids)
    if not chosen:
        raise InvalidRequest("name task ids to retry, or pass --all", field="task_ids")
    for task_id in chosen:
        record = records.get(task_id)
        if record is None:
            raise InvalidRequest(f"{task_id} is not in the dead-letter queue", field="task_ids")
        if "kind" not in record:
            raise InvalidRequest(
                f"{task_id} is a malformed message, not a task: read it with "
                "`corral dlq list --json`, fix its sender, then `corral dlq "
                "purge`",
                field="task_ids",
            )
        job = sdk.submit(record["kind"], record["payload"])
        remove_dead_letter(sdk.redis, task_id)
        click.echo(f"{task_id} → {job.id}")


@dlq.command("purge")
@click.option("--yes", is_flag=True, help="Do not ask.")
@handle_errors
def dlq_purge(yes: bool) -> None:
    """Delete every dead letter."""
    sdk = client()
    count = len(dead_letters(sdk.redis))
    if count and not yes:
        click.confirm(f"delete {count} dead letters?", abort=True)
    for record in dead_letters(sdk.redis):
        remove_dead_letter(sdk.redis, record["task_id"])
    click.echo(f"purged {count} dead letters")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--markdown", is_flag=True, help="Defaults only, as README's Markdown table.")
@handle_errors
def config(as_json: bool, markdown: bool) -> None:
    """List every setting: its environment variable, the value in effect, its default and
    meaning."""
    from producers.cli.settings_table import markdown_table, setting_rows, shown

    if markdown:
        click.echo(markdown_table(), nl=False)
        return
    rows = setting_rows(in_effect=True)
    if as_json:
        dump_json(
            [
                {"env": r.env, "value": r.value, "default": r.default, "description": r.description}
                for r in rows
            ]
        )
        return
    table(
        ["VARIABLE", "VALUE", "DEFAULT", "MEANING"],
        [(r.env, shown(r.value), shown(r.default), r.description) for r in rows],
    )


@cli.command()
@click.option("--text-model", default="llama3.2", show_default=True)
@click.option("--thinking-model", default="deepseek-r1:14b", show_default=True)
@click.option("--vision-model", default="llava:7b", show_default=True)
@handle_errors
def demo(text_model: str, thinking_model: str, vision_model: str) -> None:
    """Run one task of each kind end to end, streaming to this terminal."""
    from producers.cli.demo import run_demo

    sys.exit(run_demo(text_model, thinking_model, vision_model))


def main() -> None:
    cli(prog_name="corral")


if __name__ == "__main__":
    main()
