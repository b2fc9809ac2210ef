"""JSON as Ollama's Go server reads and writes it: ``encoding/json`` errors, limits and quirks.

Go's decoder refuses nesting beyond 10,000 levels, replaces unpaired UTF-16 surrogates with
U+FFFD, and can decode a number only within a float64. Python's decoder recurses (it fails near
1,000 levels), keeps lone surrogates (which cannot be encoded back) and turns ``1e400`` into
infinity; this module bridges the two, so the simulator answers what Ollama answers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from json.scanner import NUMBER_RE
from typing import Any

import orjson

from .golike import GoError, OutOfRange

# The C string scanner of the json module (typeshed does not declare it).
scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]

_SORT = orjson.OPT_SORT_KEYS

MAX_NESTING = 10_000
"""Go's ``encoding/json`` maxNestingDepth."""

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def _quote_char(char: str) -> str:
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    return "'" + json.dumps(char)[1:-1] + "'"


def _container_at(doc: str, pos: int) -> str:
    """Return ``"{"`` or ``"["``: the innermost open container at ``pos``."""
    stack: list[str] = []
    in_string = escaped = False
    for char in doc[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _float(text: str) -> float | OutOfRange:
    number = float(text)
    return number if math.isfinite(number) else OutOfRange(text)


def _int(text: str) -> int | OutOfRange:
    if len(text) > 300 and not math.isfinite(float(text)):  # only long ones can overflow
        return OutOfRange(text)
    return int(text)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_float, parse_int=_int)


def decode_json_body(body: bytes) -> Any:
    """Decode the first JSON value of a request body like Go's ``json.Decoder``.

    Raises ``EOFError`` for an empty body (Go's ``io.EOF``) and ``GoError`` with Go's text for
    malformed JSON. Data after the first value is ignored, as gin's decoder does. Numbers beyond
    a float64 come back as :class:`OutOfRange`, for the caller to refuse where Go would.
    """
    doc = body.decode("utf-8", errors="replace")  # invalid bytes become U+FFFD, as in Go
    start = len(doc) - len(doc.lstrip(" \t\r\n"))
    if start == len(doc):
        raise EOFError
    try:
        try:
            value, _ = _DECODER.raw_decode(doc, start)
        except RecursionError:
            value = _decode_deep(doc, start)
    except json.JSONDecodeError as exc:
        raise GoError(_go_syntax_error(doc, exc)) from exc
    except GoError:
        raise
    except ValueError as exc:  # NaN / Infinity, which Go does not accept
        raise GoError(
            f"invalid character {_quote_char(str(exc)[0])} looking for beginning of value"
        ) from exc
    if _SURROGATE_ESCAPE.search(doc):
        value = _replace_surrogates(value)
    return value


def _decode_deep(doc: str, idx: int) -> Any:
    """The same decoding without recursion, for documents nested deeper than Python's stack
    allows; its errors carry the messages of Python's own decoder (mapped to Go's above)."""
    containers: list[Any] = []  # the open arrays and objects, innermost last
    keys: list[str] = []  # the key waiting for its value in each open object
    while True:
        char = doc[idx : idx + 1]
        if char in ("{", "["):  # a value opens a container
            if len(containers) >= MAX_NESTING:
                raise GoError(f"invalid character {_quote_char(char)} exceeded max depth")
            idx = _skip(doc, idx + 1)
            if doc[idx : idx + 1] == ("}" if char == "{" else "]"):
                value: Any = {} if char == "{" else []
                idx += 1
            else:
                containers.append({} if char == "{" else [])
                if char == "{":
                    idx = _key(doc, idx, keys)
                continue
        else:
            value, idx = _scalar(doc, idx)
        while True:  # a value ended: store it, then close every container that ends here
            if not containers:
                return value
            parent = containers[-1]
            if isinstance(parent, dict):
                parent[keys.pop()] = value
            else:
                parent.append(value)
            idx = _skip(doc, idx)
            char = doc[idx : idx + 1]
            if char == ",":
                idx = _skip(doc, idx + 1)
                if isinstance(parent, dict):
                    idx = _key(doc, idx, keys)
                break
            if char != ("}" if isinstance(parent, dict) else "]"):
                raise json.JSONDecodeError("Expecting ',' delimiter", doc, idx)
            value = containers.pop()
            idx += 1


def _skip(doc: str, idx: int) -> int:
    """The index of the first non-whitespace character at or after ``idx``."""
    match = _WHITESPACE.match(doc, idx)
    return match.end() if match else idx


def _key(doc: str, idx: int, keys: list[str]) -> int:
    if doc[idx : idx + 1] != '"':
        raise json.JSONDecodeError("Expecting property name enclosed in double quotes", doc, idx)
    key, idx = scanstring(doc, idx + 1, True)
    idx = _skip(doc, idx)
    if doc[idx : idx + 1] != ":":
        raise json.JSONDecodeError("Expecting ':' delimiter", doc, idx)
    keys.append(key)
    return _skip(doc, idx + 1)


_LITERALS = (("null", None), ("true", True), ("false", False))


def _scalar(doc: str, idx: int) -> tuple[Any, int]:
    if doc[idx : idx + 1] == '"':
        return scanstring(doc, idx + 1, True)
    for word, value in _LITERALS:
        if doc.startswith(word, idx):
            return value, idx + len(word)
    match = NUMBER_RE.match(doc, idx)
    if match:
        integer, frac, exp = match.groups()
        text = integer + (frac or "") + (exp or "")
        return (_float(text) if frac or exp else _int(text)), match.end()
    for word in ("NaN", "Infinity", "-Infinity"):
        if doc.startswith(word, idx):
            _reject_constant(word)
    raise json.JSONDecodeError("Expecting value", doc, idx)


def _replace_surrogates(value: Any) -> Any:
    """Unpaired surrogates (in strings and keys) replaced by U+FFFD, as Go's decoder does."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    stack = [value] if isinstance(value, dict | list) else []
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for index, child in enumerate(node):
                node[index] = _repaired(child, stack)
        else:
            items = list(node.items())
            node.clear()
            for key, child in items:  # a later key for the same name wins, as in Go
                node[_SURROGATE.sub("\ufffd", key)] = _repaired(child, stack)
    return value


def _repaired(child: Any, stack: list[Any]) -> Any:
    if isinstance(child, str):
        return _SURROGATE.sub("\ufffd", child)
    if isinstance(child, dict | list):
        stack.append(child)
    return child


def _go_syntax_error(doc: str, exc: json.JSONDecodeError) -> str:
    pos = exc.pos
    if exc.msg.startswith("Unterminated string") or pos >= len(doc.rstrip(" \t\r\n")):
        return "unexpected EOF"
    char = _quote_char(doc[pos])
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {char} looking for beginning of object key string"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character {char} after object key"
    if exc.msg.startswith("Expecting ','"):
        where = "object key:value pair" if _container_at(doc, pos) == "{" else "array element"
        return f"invalid character {char} after {where}"
    if exc.msg.startswith("Invalid control character"):
        return f"invalid character {char} in string literal"
    if exc.msg.startswith("Invalid \\escape"):
        return (
            f"invalid character {_quote_char(doc[pos + 1 : pos + 2] or ' ')} in string escape code"
        )
    return f"invalid character {char} looking for beginning of value"


def dumps(
    value: Any, *, sort_keys: bool = False, default: Callable[[Any], Any] | None = None
) -> str:
    """Compact JSON as Go's ``json.Marshal`` writes it (HTML characters escaped); any depth.

    orjson writes it first (an embed reply carries hundreds of vectors); what it refuses (a
    nesting past its limit, a lone surrogate, a key that is not a string, an integer past 64
    bits) the json module writes, as Go would or as close to it as Python can."""
    try:
        text = orjson.dumps(value, default=default, option=_SORT if sort_keys else 0).decode()
    except TypeError:  # orjson.JSONEncodeError included
        try:
            text = json.dumps(
                value,
                separators=(",", ":"),
                ensure_ascii=False,
                sort_keys=sort_keys,
                default=default,
            )
        except RecursionError:
            text = dumps_deep(value, sort_keys, default)
    if "<" in text or ">" in text or "&" in text or "\u2028" in text or "\u2029" in text:
        text = (
            text.replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    return text


def dumps_deep(value: Any, sort_keys: bool, default: Callable[[Any], Any] | None) -> str:
    """``json.dumps`` without recursion, for values nested deeper than Python's stack allows."""
    parts: list[str] = []
    stack: list[tuple[bool, Any]] = [(False, value)]  # (is raw text, item)
    while stack:
        raw, item = stack.pop()
        if raw:
            parts.append(item)
            continue
        if isinstance(item, dict):
            pairs = sorted(item.items()) if sort_keys else list(item.items())
            tokens: list[tuple[bool, Any]] = [(True, "{")]
            for n, (key, child) in enumerate(pairs):
                tokens += [
                    (True, ("," if n else "") + json.dumps(str(key), ensure_ascii=False) + ":"),
                    (False, child),
                ]
            stack.extend(reversed([*tokens, (True, "}")]))
        elif isinstance(item, list | tuple):
            tokens = [(True, "[")]
            for n, child in enumerate(item):
                tokens += [(True, ","), (False, child)] if n else [(False, child)]
            stack.extend(reversed([*tokens, (True, "]")]))
        else:
            parts.append(json.dumps(item, ensure_ascii=False, default=default))
    return "".join(parts)
