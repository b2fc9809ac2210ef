"""Untrusted JSON: parsed and walked without recursion, so that nesting cannot crash anything.

Python's ``json``, pydantic's serializer and every recursive walker raise ``RecursionError`` (or
a ``ValueError`` of their own) somewhere near 1,000 levels, and a request can nest far deeper
than that. The walkers here use an explicit stack, and :func:`parse_json` turns every problem
into :class:`InvalidRequest` naming the input, so that deep or odd input is refused at the door.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from tasks.errors import InvalidRequest

Path = tuple[str | int, ...]
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTAINERS = (dict, list, tuple)


def path_text(path: Path) -> str:
    """``("messages", 0, "content")`` → ``messages.0.content``, as payload errors name fields
    (a surrogate in a key is escaped, so that the text can always be printed)."""
    text = ".".join(str(part) for part in path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _children(node: Any) -> list[tuple[str | int, Any]]:
    if isinstance(node, dict):
        return list(node.items())
    return list(enumerate(node))


def too_deep(value: Any, limit: int) -> Path | None:
    """The path to the first container nested deeper than ``limit`` levels, or None.

    A top-level object or array is level 1; scalars add no level.
    """
    if not isinstance(value, _CONTAINERS):
        return None
    stack: list[tuple[Any, int, Path]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > limit:
            return path
        for key, child in reversed(_children(node)):  # reversed: pop in document order
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1, (*path, key)))
    return None


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def lone_surrogate(value: Any) -> Path | None:
    """The path to the first string (or object key) holding an unpaired UTF-16 surrogate.

    Such a string cannot be encoded as UTF-8: Python refuses to send it anywhere.
    """
    stack: list[tuple[Any, Path]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _has_surrogate(node):
                return path
        elif isinstance(node, _CONTAINERS):
            for key, child in reversed(_children(node)):
                if isinstance(key, str) and _has_surrogate(key):
                    return (*path, key)
                stack.append((child, (*path, key)))
    return None


def replace_lone_surrogates(value: Any) -> Any:
    """``value`` with every unpaired surrogate (in strings and keys) replaced by U+FFFD.

    This is what Go's ``encoding/json`` does with ``"\\ud800"``, so what Ollama does.
    Containers are changed in place.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    stack = [value] if isinstance(value, _CONTAINERS) else []
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            for index, child in enumerate(node):
                if isinstance(child, str) and _has_surrogate(child):
                    node[index] = _SURROGATE.sub("\ufffd", child)
                elif isinstance(child, _CONTAINERS):
                    stack.append(child)
        elif isinstance(node, dict):
            items = list(node.items())
            node.clear()
            for key, child in items:  # a later key for the same name wins, as in Go
                if isinstance(child, str) and _has_surrogate(child):
                    child = _SURROGATE.sub("\ufffd", child)
                elif isinstance(child, _CONTAINERS):
                    stack.append(child)
                node[_SURROGATE.sub("\ufffd", key) if _has_surrogate(key) else key] = child
    return value


def nesting_error(what: str, limit: int, field: str | None = None) -> InvalidRequest:
    """The refusal of a value nested deeper than ``limit`` (or than Python can parse)."""
    return InvalidRequest(
        f"{what} nests deeper than {limit} levels of objects and arrays "
        "(CORRAL_MAX_JSON_DEPTH); flatten it",
        field=field,
    )


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number {text} is out of range (beyond a 64-bit float)")
    return number


def _integer(text: str) -> int:
    if len(text) > 300:  # only such long literals can overflow a float64
        _finite(text)
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, *, what: str, max_depth: int, field: str | None = None) -> Any:
    """Parse untrusted JSON text, or raise :class:`InvalidRequest` naming ``what``: invalid
    JSON, NaN or numbers beyond a float64 (Ollama's Go refuses both), nesting beyond
    ``max_depth``."""
    try:
        value = json.loads(
            text, parse_float=_finite, parse_int=_integer, parse_constant=_no_constant
        )
    except RecursionError as exc:
        raise nesting_error(what, max_depth, field) from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the checks above
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", field=field) from exc
    path = too_deep(value, max_depth)
    if path is not None:
        where = path_text(path[:1])  # the top-level field that nests too deeply
        raise nesting_error(f"{what} ({where})" if where else what, max_depth, field or where)
    return value


__all__ = [
    "lone_surrogate",
    "nesting_error",
    "parse_json",
    "path_text",
    "replace_lone_surrogates",
    "too_deep",
]
