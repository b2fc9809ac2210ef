"""Go-flavoured details the real server exposes: durations, base64, timestamps, names.

Ollama is written in Go, and several of its error texts and formats come straight from the Go
standard library (``time.ParseDuration``, ``encoding/base64``, RFC 3339 with nanoseconds;
``encoding/json`` is in :mod:`ollama_sim.gojson`). This module reproduces those details so
clients see the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

FOREVER_S = math.inf
"""keep_alive value meaning "never unload" (Go uses MaxInt64 nanoseconds)."""

_MAX_INT64_NS = 2**63 - 1

_UNITS_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d*\.?\d*)([^\d.]*)")


class GoError(ValueError):
    """A Go-style error text, raised where Go would return an error."""


@dataclass(frozen=True)
class OutOfRange:
    """A JSON number beyond a float64, kept as its text: Go refuses to decode it wherever it
    must become a number, with this text in the error."""

    text: str

    def __str__(self) -> str:
        return self.text


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string (``"5m"``, ``"1h30m"``, ``"-1s"``) into seconds."""
    quoted = json.dumps(text)
    rest = text
    sign = 1.0
    if rest[:1] in "+-" and rest:
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise GoError(f"time: invalid duration {quoted}")
    total_ns = 0.0
    while rest:
        match = _DURATION_PART.match(rest)
        number, unit = (match.group(1), match.group(2)) if match else ("", "")
        if not number or number == ".":
            raise GoError(f"time: invalid duration {quoted}")
        if not unit:
            raise GoError(f"time: missing unit in duration {quoted}")
        if unit not in _UNITS_NS:
            raise GoError(f"time: unknown unit {json.dumps(unit)} in duration {quoted}")
        total_ns += float(number) * _UNITS_NS[unit]
        rest = rest[len(number) + len(unit) :]
    return sign * total_ns / 1e9


def go_type_name(value: Any) -> str:
    """The Go ``%T`` of a value decoded from JSON into ``any``."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float | OutOfRange):
        return "float64"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    return "map[string]interface {}"


def parse_keep_alive(value: Any) -> float | None:
    """Decode a ``keep_alive`` JSON value like Go's ``api.Duration``; None means absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GoError(f"unsupported duration type: '{go_type_name(value)}'")
    seconds = float(value) if not isinstance(value, str) else parse_go_duration(value)
    return FOREVER_S if seconds < 0 else seconds


# --- base64 as Go's encoding/base64 StdEncoding -------------------------------------------------

_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def decode_go_base64(text: str) -> bytes:
    """Decode padded standard base64; errors carry Go's ``illegal base64 data at input byte N``."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GoError(f"illegal base64 data at input byte {_corrupt_offset(text)}") from None


def _corrupt_offset(text: str) -> int:
    """The byte offset Go's ``base64.StdEncoding`` reports for malformed input."""
    n = len(text)
    si = 0

    def skip_newlines(pos: int) -> int:
        while pos < n and text[pos] in "\r\n":
            pos += 1
        return pos

    while True:
        j = 0
        while j < 4:
            si = skip_newlines(si)
            if si == n:
                return si - j if j else n
            char = text[si]
            si += 1
            if char in _B64_ALPHABET:
                j += 1
                continue
            if char != "=" or j < 2:
                return si - 1
            if j == 2:
                si = skip_newlines(si)
                if si == n:
                    return n
                if text[si] != "=":
                    return si - 1
                si += 1
            si = skip_newlines(si)
            return si if si < n else n


# --- timestamps ---------------------------------------------------------------------------------

_second_cache: tuple[int, str] = (-1, "")


def utc_timestamp(now_ns: int | None = None) -> str:
    """RFC 3339 UTC with up to nine fractional digits, trailing zeros dropped, as Go prints."""
    global _second_cache
    now_ns = time.time_ns() if now_ns is None else now_ns
    seconds, frac = divmod(now_ns, 1_000_000_000)
    if _second_cache[0] != seconds:
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (seconds, text)
    base = _second_cache[1]
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def local_timestamp(unix_s: float) -> str:
    """RFC 3339 in the server's local zone (offset, or ``Z`` when the zone is UTC)."""
    forever = unix_s == FOREVER_S
    unix_ns = time.time_ns() + _MAX_INT64_NS if forever else int(unix_s * 1e9)
    seconds, frac = divmod(unix_ns, 1_000_000_000)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
    local = moment.astimezone()
    offset = local.utcoffset() or timedelta(0)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += f".{frac:09d}".rstrip("0")
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


# --- model names --------------------------------------------------------------------------------

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,79}")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-:]{0,349}")


@dataclass(frozen=True)
class ModelName:
    """A parsed ``[host/][namespace/]model[:tag]`` reference."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def short(self) -> str:
        """The name as ``ollama list`` prints it, e.g. ``llama3.2:latest``."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return self.full

    @property
    def full(self) -> str:
        """The fully qualified name, e.g. ``registry.ollama.ai/library/llama3.2:latest``."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


def parse_model_name(text: str) -> ModelName | None:
    """Parse a model reference; None when Go's ``model.ParseName`` would call it invalid."""
    name = text.split("@", 1)[0]
    parts = name.split("/")
    if len(parts) > 3:
        return None
    last = parts[-1]
    model, _, tag = last.partition(":") if last.count(":") <= 1 else ("", "", "")
    tag = tag or DEFAULT_TAG
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[0] if len(parts) == 3 else DEFAULT_HOST
    if not (
        _PART.fullmatch(model)
        and _TAG.fullmatch(tag)
        and _PART.fullmatch(namespace)
        and _HOST.fullmatch(host)
    ):
        return None
    return ModelName(host.lower(), namespace.lower(), model.lower(), tag.lower())
