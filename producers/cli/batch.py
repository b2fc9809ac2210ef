"""``corral batch``: submit a JSONL file of requests, follow it, fetch its output."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click

from producers.batches import DEFAULT_OWNER, Batch, list_batches, submit_batch
from producers.cli.main import client as make_client
from producers.cli.render import dump_json, handle_errors, table
from producers.client import Client
from tasks.batches import BatchInfo
from tasks.errors import InvalidRequest

PLAIN_EVERY_S = 5.0  # without a terminal, a progress line this often


@click.group()
def batch() -> None:
    """Batch jobs: a JSONL file of OpenAI-style requests in, an output file out.

    Each line is {"custom_id", "method": "POST", "url", "body"} with url /v1/chat/completions,
    /v1/completions, /v1/embeddings or /v1/tasks/KIND (docs/batches.md).
    """


def parse_window(value: str | None) -> float | None:
    """``24h``, ``90m``, ``30s`` or plain seconds."""
    if value is None:
        return None
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    try:
        if value[-1:] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"--completion-window: {value!r} is not a duration; give e.g. 24h, 90m or 3600",
            field="completion_window",
        ) from exc


def summary(info: BatchInfo) -> str:
    eta = info.eta_s()
    eta_text = "" if eta is None or info.ended else f", ETA {eta:.0f} s"
    return (
        f"{info.id}: {info.status}, {info.done}/{info.total} done "
        f"({info.completed} completed, {info.failed} failed){eta_text}"
    )


class ProgressView:
    """A live bar on a terminal (click's progressbar), a plain line now and then elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.bar: Any = None
        self.shown = 0
        self.last_plain = 0.0
        self.started = time.monotonic()

    def __call__(self, info: BatchInfo) -> None:
        if not self.tty:
            if info.ended or time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
                click.echo(summary(info), file=self.stream)
                self.last_plain = time.monotonic()
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=max(info.total, 1),
                label=info.id,
                file=self.stream,
                show_pos=True,
                show_eta=True,
                item_show_func=lambda _: self.detail,
            )
            self.bar.__enter__()
        rate = info.done / max(time.monotonic() - self.started, 1e-3)
        self.detail = f"{info.failed} failed, {rate:.1f}/s, {info.status}"
        self.bar.length = max(info.total, 1)
        self.bar.update(info.done - self.shown, None)
        self.shown = info.done

    detail = ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def submitting(stream: TextIO) -> Callable[[int], None]:
    """Shows the line being submitted: live on a terminal, now and then elsewhere."""
    tty = stream.isatty()
    every_s = 0.2 if tty else PLAIN_EVERY_S
    last = time.monotonic()

    def on_line(number: int) -> None:
        nonlocal last
        if time.monotonic() - last >= every_s:
            last = time.monotonic()
            click.echo(f"\rsubmitting: line {number}", file=stream, nl=not tty)

    return on_line


def follow(batch_handle: Batch, out: Path | None, errors: Path | None) -> BatchInfo:
    """Wait with a progress view; Ctrl-C leaves the batch running and says how to follow it."""
    view = ProgressView(sys.stderr)
    try:
        click.echo(batch_handle.id, err=True)  # inside: a Ctrl-C right after it is handled too
        info = batch_handle.wait(progress=view)
    except KeyboardInterrupt:
        view.close()
        click.echo(
            f"\nstopped waiting; batch {batch_handle.id} keeps running. Follow it with "
            f"`corral batch status {batch_handle.id}`, fetch its output with "
            f"`corral batch results {batch_handle.id} -o OUT.jsonl`",
            err=True,
        )
        sys.exit(130)
    view.close()
    write_output(batch_handle, out, errors)
    return info


def write_output(batch_handle: Batch, out: Path | None, errors: Path | None) -> None:
    for path, lines in ((out, batch_handle.results), (errors, batch_handle.errors)):
        if path is None:
            continue
        with open(path, "w", encoding="utf-8") as handle:
            count = 0
            for line in lines():
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
                count += 1
        click.echo(f"{count} lines written to {path}", err=True)


@batch.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=2,
    show_default=True,
    help="Scheduling priority of the lines (interactive work uses 5).",
)
@click.option(
    "--completion-window",
    help="Time to finish before unfinished lines expire "
    "(24h, 90m, 3600; default CORRAL_BATCH_COMPLETION_WINDOW_S).",
)
@click.option("--endpoint", help="Refuse lines whose url differs (OpenAI batches have one).")
@click.option(
    "--key",
    default="",
    help="Run the same file again as a new batch: a new key. "
    "Without it, submitting the same file resumes or shows the first batch.",
)
@click.option(
    "--owner",
    default=DEFAULT_OWNER,
    show_default=True,
    help="Whose batch it is (`corral batch list --owner`).",
)
@click.option("--metadata", "metadata", multiple=True, metavar="KEY=VALUE")
@click.option(
    "--callback-url",
    help="POST the batch's end here (batch.completed, .failed, .expired, .cancelled), signed "
    "with CORRAL_WEBHOOK_SECRET.",
)
@click.option("--wait", is_flag=True, help="Follow the batch until it ends.")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the output lines here once it ends (implies --wait).",
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the error lines here once it ends (implies --wait).",
)
@handle_errors
def submit(
    file: Path,
    priority: int,
    completion_window: str | None,
    endpoint: str | None,
    key: str,
    owner: str,
    metadata: tuple[str, ...],
    callback_url: str | None,
    wait: bool,
    out: Path | None,
    errors: Path | None,
) -> None:
    """Submit FILE.jsonl as a batch; prints its id. Submitting it again after a crash resumes."""
    meta = dict(pair.split("=", 1) for pair in metadata if "=" in pair)
    with make_client() as client:
        try:
            handle = submit_batch(
                client,
                file,
                owner=owner,
                key=key,
                priority=priority,
                completion_window_s=parse_window(completion_window),
                endpoint=endpoint,
                metadata=meta,
                callback_url=callback_url,
                on_line=submitting(sys.stderr),
            )
            if sys.stderr.isatty():
                click.echo("\r\033[K", nl=False, err=True)  # clear the "submitting" line
        except KeyboardInterrupt:
            click.echo(
                "\nstopped submitting; the lines submitted so far run. Submit the same "
                "file again (same --key) to submit the rest",
                err=True,
            )
            sys.exit(130)
        info = handle.info()
        if not (wait or out or errors):
            click.echo(handle.id)
            click.echo(summary(info), err=True)
            return
        info = follow(handle, out, errors)
        click.echo(summary(info))
        if info.status != "completed":
            sys.exit(1)


def _handle(client: Client, batch_id: str) -> Batch:
    handle = Batch(client, batch_id)
    handle.info()  # an unknown id raises TaskNotFound here
    return handle


@batch.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="OpenAI's batch object.")
@handle_errors
def status(batch_id: str, as_json: bool) -> None:
    """A batch's status and counters (it also writes the outcomes that arrived)."""
    with make_client() as client:
        handle = _handle(client, batch_id)
        info = handle.status()
        handle.close()
    if as_json:
        dump_json(info.to_openai())
    else:
        click.echo(summary(info))


@batch.command()
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the output lines.",
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the error lines.",
)
@handle_errors
def results(batch_id: str, out: Path, errors: Path | None) -> None:
    """Write a batch's output (and error) lines, as OpenAI's Batch API writes them."""
    with make_client() as client:
        handle = _handle(client, batch_id)
        info = handle.status()
        handle.close()
        if not info.ended:
            click.echo(f"batch {batch_id} is still {info.status}: the lines so far", err=True)
        write_output(handle, out, errors)


@batch.command()
@click.argument("batch_id")
@handle_errors
def cancel(batch_id: str) -> None:
    """Cancel a batch: queued lines at once, running ones within a chunk; finished ones stay."""
    with make_client() as client:
        handle = _handle(client, batch_id)
        info = handle.cancel()
        handle.close()
    click.echo(summary(info))


@batch.command("list")
@click.option("--owner", default=DEFAULT_OWNER, show_default=True)
@click.option("--after", help="The last id of the previous page.")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="OpenAI's list object.")
@handle_errors
def list_command(owner: str, after: str | None, limit: int, as_json: bool) -> None:
    """Batches, newest first."""
    with make_client() as client:
        found, more = list_batches(client, owner, after=after, limit=limit)
    if as_json:
        data = [info.to_openai() for info in found]
        dump_json(
            {
                "object": "list",
                "data": data,
                "has_more": more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )
        return
    rows = [
        [
            i.id,
            i.status,
            f"{i.done}/{i.total}",
            str(i.failed),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created_at)),
        ]
        for i in found
    ]
    table(["batch", "status", "done", "failed", "created"], rows)
    if more:
        click.echo(f"more: corral batch list --after {found[-1].id}", err=True)
