"""Terminal output: live token printing, tables a person can read, errors with a next step."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TextIO

import click

from tasks.errors import (
    BrokerUnavailable,
    CorralError,
    InvalidRequest,
    InvalidSetting,
    ModelNotFound,
    OllamaUnavailable,
    StructuredOutputError,
    TaskNotFound,
    error_from_dict,
)
from tasks.events import QUEUED

DIM, RESET, BOLD = "\033[2m", "\033[0m", "\033[1m"

# The first class an error is an instance of gives its next step; "" when its message says it.
NEXT_STEPS: dict[type[CorralError], str] = {
    InvalidSetting: "",
    InvalidRequest: "fix {field} and submit again",
    ModelNotFound: "pull the model on the Ollama host (`ollama pull NAME`) or check its name",
    OllamaUnavailable: "check that Ollama runs and OLLAMA_HOST points at it",
    BrokerUnavailable: "check that Redis runs and CORRAL_REDIS_URL points at it",
    TaskNotFound: "check the task id; results expire after CORRAL_RESULT_TTL_S",
    StructuredOutputError: "simplify the schema, or try a larger model",
}


def styled(text: str, style: str, stream: TextIO) -> str:
    return f"{style}{text}{RESET}" if stream.isatty() else text


def describe_error(exc: CorralError) -> str:
    """``error: <message>`` plus what to do next."""
    lines = [f"error: {exc.message} ({type(exc).__name__})"]
    for cls, hint in NEXT_STEPS.items():
        if isinstance(exc, cls):
            if hint:
                field = exc.info.get("field")
                lines.append("  next: " + hint.format(field=field or "the request"))
            break
    if exc.retryable:
        lines.append("  next: this failure is transient; submitting again may succeed")
    return "\n".join(lines)


def about(seconds: float) -> str:
    """A rough duration: ``~40 s``, ``~3 min``, ``~2 h``."""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{round(seconds / 3600)} h"


def describe_queued(event: dict[str, Any]) -> str:
    """``position 12, starts in ~40 s`` for a ``queued`` event."""
    position, eta = event["position"], event.get("eta_s")
    text = f"position {position}" + (" (next)" if position == 0 else "")
    if eta is not None:
        text += ", starts now" if eta <= 0 else f", starts in {about(eta)}"
    return text


class QueuedLine:
    """Where a waiting task stands, on stderr: rewritten in place on a terminal, one line per
    change otherwise."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.open = False  # a rewritable line is showing

    def show(self, event: dict[str, Any]) -> None:
        text = "queued: " + describe_queued(event)
        if self.err.isatty():
            self.err.write(f"\r{styled(text, DIM, self.err)}\033[K")
            self.open = True
        else:
            self.err.write(text + "\n")
        self.err.flush()

    def close(self) -> None:
        if self.open:
            self.err.write("\n")
            self.err.flush()
            self.open = False


def print_queued(events: Iterator[dict[str, Any]], err: TextIO | None = None) -> None:
    """Show the ``queued`` events until the task's own events begin (or the stream ends)."""
    line = QueuedLine(err or sys.stderr)
    for event in events:
        if event["type"] != QUEUED:
            break
        line.show(event)
    line.close()


def print_events(
    events: Iterator[dict[str, Any]], out: TextIO | None = None, err: TextIO | None = None
) -> dict[str, Any]:
    """Print text live (thinking dimmed), mark restarts, and return the terminal event.

    While the task waits, where it stands goes to ``err`` ("position 12, starts in ~40 s").
    """
    out = out or sys.stdout
    err = err or sys.stderr
    in_thinking = False
    waiting = QueuedLine(err)
    for event in events:
        kind = event["type"]
        if kind == QUEUED:
            waiting.show(event)
            continue
        waiting.close()
        if kind == "thinking":
            out.write(
                styled(event["text"], DIM, out)
                if in_thinking
                else styled("[thinking] " + event["text"], DIM, out)
            )
            in_thinking = True
        elif kind == "token":
            if in_thinking:
                out.write("\n")
                in_thinking = False
            out.write(event["text"])
        elif kind == "restart":
            out.write("\n")
            err.write(
                styled(
                    f"↻ restarting: {event.get('reason', '')}; the text above is discarded\n",
                    BOLD,
                    err,
                )
            )
        elif kind in ("done", "error", "cancelled"):
            out.write("\n")
            out.flush()
            return event
        out.flush()
    return {"type": "error", "error": {"type": "CorralError", "message": "stream ended early"}}


def raise_for_terminal(event: dict[str, Any]) -> dict[str, Any]:
    """The result of a ``done`` event, or the typed error of an ``error``/``cancelled`` one."""
    if event["type"] == "done":
        return event["result"]
    if event["type"] == "cancelled":
        raise error_from_dict(
            {"type": "TaskCancelled", "message": event.get("reason", "cancelled")}
        )
    raise error_from_dict(event.get("error", {}))


def by_priority(counts: dict[int, int]) -> str:
    """Pending tasks per aged priority, highest first: ``9:2 5:40 0:100``."""
    return " ".join(f"{band}:{n}" for band, n in sorted(counts.items(), reverse=True)) or "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out: TextIO | None = None) -> None:
    """A plain aligned table; numbers right-aligned."""
    out = out or sys.stdout
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_is_number(row[i]) for row in cells[1:]) and len(cells) > 1 for i in range(len(headers))
    ]
    for n, row in enumerate(cells):
        line = "  ".join(
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        )
        out.write((styled(line.rstrip(), BOLD, out) if n == 0 else line.rstrip()) + "\n")
    if len(cells) == 1:
        out.write("(none)\n")


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return text == ""


def dump_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Print typed errors with a next step; exit 2 for bad input, 1 for other failures."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CorralError as exc:
            click.echo(describe_error(exc), err=True)
            sys.exit(2 if isinstance(exc, InvalidRequest) else 1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper
