"""A Grafana dashboard checked against Grafana's own dashboard schema, as the generated Python
models of ``grafana-foundation-sdk`` (the release for the Grafana version docker-compose.yml
runs) carry it.

The models decode leniently: ``from_json`` drops keys it does not know and keeps values as they
come. So a dashboard is checked twice: every key survives a decode and re-encode unchanged (no
key outside the schema, no value rewritten), and every decoded value has the type its model
field declares (enums by value, nested objects recursively, required fields present).
"""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

register_default_plugins()  # panel options and queries decode into their plugins' models


def dashboard_problems(raw: dict[str, Any]) -> list[str]:
    """Every way ``raw`` departs from the dashboard schema; empty when it conforms."""
    model = Dashboard.from_json(raw)
    problems: list[str] = []
    _unknown_keys(raw, _encoded(model), "dashboard", problems)
    _check(model, Dashboard, "dashboard", problems)
    return problems


def _encoded(model: object) -> Any:
    return json.loads(json.dumps(model, cls=JSONEncoder))


def _unknown_keys(raw: Any, encoded: Any, path: str, problems: list[str]) -> None:
    if isinstance(raw, dict) and isinstance(encoded, dict):
        for key, value in raw.items():
            if key in encoded:
                _unknown_keys(value, encoded[key], f"{path}.{key}", problems)
            else:
                problems.append(f"{path}.{key}: not in the schema")
    elif isinstance(raw, list) and isinstance(encoded, list) and len(raw) == len(encoded):
        for i, (a, b) in enumerate(zip(raw, encoded, strict=True)):
            _unknown_keys(a, b, f"{path}[{i}]", problems)
    elif raw != encoded:
        problems.append(f"{path}: {raw!r} does not survive the schema (became {encoded!r})")


def _fields(model: object) -> dict[str, Any]:
    return typing.get_type_hints(type(model))


def _check(value: Any, hint: Any, path: str, problems: list[str]) -> None:  # noqa: C901, PLR0911, PLR0912
    """``value`` has the type ``hint`` (a model field's annotation)."""
    if hint in (typing.Any, object):  # a plugin's options or field config: its own model
        if hasattr(value, "to_json"):
            _check(value, type(value), path, problems)
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return
        # A decoded object is checked as the model it was decoded into (a panel, not a row).
        options = [o for o in options if isinstance(o, type) and isinstance(value, o)] or options
        attempts = []
        for option in options:
            found: list[str] = []
            _check(value, option, path, found)
            if not found:
                return
            attempts.append(found)
        problems.extend(min(attempts, key=len))
        return
    if value is None:
        problems.append(f"{path}: required, missing")
    elif origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: {value!r} is not a list")
            return
        (item,) = typing.get_args(hint) or (typing.Any,)
        for i, element in enumerate(value):
            _check(element, item, f"{path}[{i}]", problems)
    elif origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: {value!r} is not an object")
    elif origin is typing.Literal:
        if value not in typing.get_args(hint):
            problems.append(f"{path}: {value!r} is not one of {typing.get_args(hint)}")
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        raw = value.value if isinstance(value, enum.Enum) else value
        if raw not in {member.value for member in hint}:
            problems.append(f"{path}: {value!r} is not a {hint.__name__}")
    elif hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: {value!r} is not a boolean")
    elif hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if hint is int else int | float):
            problems.append(f"{path}: {value!r} is not a {hint.__name__}")
    elif hint is str:
        if not isinstance(value, str):
            problems.append(f"{path}: {value!r} is not a string")
    elif isinstance(hint, type) and hasattr(hint, "from_json"):
        if isinstance(value, dict):  # a field the parent's from_json leaves undecoded
            decoded = hint.from_json(value)
            _unknown_keys(value, _encoded(decoded), path, problems)
            value = decoded
        if not isinstance(value, hint):
            problems.append(f"{path}: {type(value).__name__} is not a {hint.__name__}")
            return
        for name, field_hint in _fields(value).items():
            _check(getattr(value, name, None), field_hint, f"{path}.{name}", problems)
    elif isinstance(hint, type):
        if not isinstance(value, hint):
            problems.append(f"{path}: {type(value).__name__} is not a {hint.__name__}")
    else:
        problems.append(f"{path}: cannot check the type {hint!r}")
