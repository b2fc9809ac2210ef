"""What ``corral submit`` reads besides its arguments: a prompt or message from standard input or
a file, JSON from a file or as text, files named by options.

A failure is an :class:`InvalidRequest` naming the option (``field``), in one line that says
what to do; the CLI prints it and exits with status 2, before anything is enqueued.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tasks.errors import InvalidRequest
from tasks.settings import load_settings
from tasks.untrusted import parse_json

STDIN = "-"


class TextArgument(click.Argument):
    """A kind's prompt or message: the text itself, or ``-`` to read standard input.

    ``corral submit`` adds :meth:`file_option` (``--prompt-file FILE`` for an argument named
    ``prompt``) and calls :meth:`resolve`. Both ways exist because Linux caps one argument at
    128 KiB, below ``CORRAL_MAX_PROMPT_CHARS``.
    """

    def __init__(self, name: str) -> None:
        super().__init__([name], required=False)

    @property
    def label(self) -> str:
        return (self.name or "text").upper()

    @property
    def file_flag(self) -> str:
        return f"--{self.name}-file"

    def file_option(self) -> click.Option:
        return click.Option(
            [self.file_flag, f"{self.name}_file"],
            type=click.Path(allow_dash=True),
            metavar="FILE",
            help=f"Read {self.label} from FILE (UTF-8, used as is; '-': standard input).",
        )

    def epilog(self) -> str:
        return (
            f"{self.label} may be '-' to read it from standard input; {self.file_flag} FILE "
            "reads it from a file (for a text longer than the OS allows in an argument)."
        )

    def resolve(self, value: str | None, path: str | None) -> str:
        """The text, from the argument, standard input (``-``) or the file option."""
        if value is not None and path is not None:
            raise InvalidRequest(
                f"{self.file_flag}: give {self.label} or {self.file_flag}, not both",
                field=self.file_flag,
            )
        if path == STDIN:
            return read_stdin(self.file_flag)
        if path is not None:
            hint = "give the path of an existing file, or '-' for standard input"
            return read_text(path, self.file_flag, hint)
        if value is None:
            raise InvalidRequest(
                f"{self.label} is missing: give it as an argument, '-' to read it from standard "
                f"input, or {self.file_flag} FILE",
                field=self.name,
            )
        return read_stdin(self.label) if value == STDIN else value


def read_stdin(option: str) -> str:
    """All of standard input, as UTF-8 text."""
    if sys.stdin.isatty():
        click.echo(f"{option}: reading standard input; end it with Ctrl-D", err=True)
    return _decode(sys.stdin.buffer.read(), option, "standard input")


def read_bytes(path: str | Path, option: str, hint: str) -> bytes:
    """The bytes of the file ``option`` names; ``hint`` says what to give instead."""
    try:
        return Path(path).expanduser().read_bytes()
    except FileNotFoundError as exc:
        where = "" if Path(path).is_absolute() else f" (in {Path.cwd()})"
        problem = f"file {str(path)!r} does not exist{where}"
        raise InvalidRequest(f"{option}: {problem}; {hint}", field=option) from exc
    except IsADirectoryError as exc:
        problem = f"{str(path)!r} is a directory"
        raise InvalidRequest(f"{option}: {problem}; {hint}", field=option) from exc
    except OSError as exc:
        problem = f"cannot read {str(path)!r}: {exc.strerror}"
        raise InvalidRequest(f"{option}: {problem}; {hint}", field=option) from exc


def read_text(path: str | Path, option: str, hint: str) -> str:
    """The UTF-8 text of the file ``option`` names."""
    return _decode(read_bytes(path, option, hint), option, f"file {str(path)!r}")


def _decode(data: bytes, option: str, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"{option}: {where} is not UTF-8 text (byte {exc.start}); save it as UTF-8",
            field=option,
        ) from exc


def json_argument(value: str | None, option: str) -> str | dict[str, Any] | None:
    """``json``, or a JSON document: JSON text when it starts with ``{`` or ``[``, else a path.

    The two are told apart so that a mistyped path says the file is missing, and broken JSON
    says where it breaks.
    """
    if value is None or value == "json":
        return value
    if value.lstrip().startswith(("{", "[")):
        text, where = value, "the JSON text"
    else:
        hint = "give the path of an existing file, or the JSON text itself"
        text, where = read_text(value, option, hint), f"file {value!r}"
    limit = load_settings().max_json_depth
    parsed: str | dict[str, Any] | None = parse_json(
        text, what=f"{option}: {where}", max_depth=limit, field=option
    )
    return parsed
