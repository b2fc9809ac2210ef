"""Fault injection: configured rates and one-shot faults, turned into a plan per request.

Fault configuration (every field optional)::

    {"error_rate": {"500": 0.1, "503": 0.2},      # per generate/chat/embed request
     "crash_after_tokens": 12,                     # every generation dies after 12 tokens
     "stall_seconds": 5, "stall_after_tokens": 3,  # go silent for 5 s after 3 tokens
     "first_byte_delay_seconds": 1.5,              # extra wait before the first byte
     "legacy_errors": false,                       # pre-first-token errors as 200 + error line
     "fail_next": [{"type": "status", "status": 503, "error": "optional", "model": "optional",
                    "prompt_contains": "optional"},
                   {"type": "crash_after", "tokens": 5}, {"type": "stall", "seconds": 10,
                   "after_tokens": 3}, {"type": "invalid_format"}, {"type": "close"}]}

``fail_next`` is a FIFO: each entry is used once, by the next generate or chat request that
matches its optional ``model`` and whose prompt (or messages, or embed input) holds its optional
``prompt_contains`` text (a ``status`` entry also by an embed request). The text lets a test aim
a fault at its own request, so that a request of another client cannot take it first.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from .golike import parse_model_name
from .scheduler import SERVER_BUSY

RUNNER_STOPPED = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)
_FAIL_TYPES = ("status", "crash_after", "stall", "invalid_format", "close")
_FIELDS = (
    "error_rate",
    "crash_after_tokens",
    "stall_seconds",
    "stall_after_tokens",
    "first_byte_delay_seconds",
    "legacy_errors",
    "fail_next",
)


class FaultConfigError(ValueError):
    """An invalid fault configuration was submitted."""


def status_message(status: int) -> str:
    """The error text an injected status carries unless the fault names its own."""
    if status == 500:
        return RUNNER_STOPPED
    if status == 503:
        return SERVER_BUSY
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


@dataclass
class FaultPlan:
    """What goes wrong with one request."""

    status: int | None = None
    error: str = ""
    crash_after: int | None = None
    stall_s: float = 0.0
    stall_after: int = 0
    invalid_format: bool = False
    close: bool = False
    first_byte_delay_s: float = 0.0
    legacy: bool = False
    applied: list[str] = field(default_factory=list)


def _empty() -> dict[str, Any]:
    return {
        "error_rate": {},
        "crash_after_tokens": None,
        "stall_seconds": 0.0,
        "stall_after_tokens": 0,
        "first_byte_delay_seconds": 0.0,
        "legacy_errors": False,
        "fail_next": [],
    }


def _number(data: dict[str, Any], key: str, minimum: float = 0.0) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise FaultConfigError(f"{key} must be a number >= {minimum:g}")
    return float(value)


def _validate_entry(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict) or entry.get("type") not in _FAIL_TYPES:
        raise FaultConfigError(f"fail_next entries need a type among {list(_FAIL_TYPES)}")
    entry = dict(entry)
    kind = entry["type"]
    if kind == "status":
        status = entry.get("status")
        if not isinstance(status, int) or not 400 <= status <= 599:
            raise FaultConfigError("a status fault needs an HTTP status 400..599")
    elif kind == "crash_after":
        entry["tokens"] = int(_number(entry, "tokens")) if "tokens" in entry else 0
    elif kind == "stall":
        entry["seconds"] = _number(entry, "seconds") if "seconds" in entry else 1.0
        entry["after_tokens"] = (
            int(_number(entry, "after_tokens")) if "after_tokens" in entry else 0
        )
    for key in ("model", "prompt_contains"):
        if key in entry and not isinstance(entry[key], str):
            raise FaultConfigError(f"{key} must be a string")
    return entry


def validate(data: Any) -> dict[str, Any]:
    """Check a (partial) fault configuration and return it normalised."""
    if not isinstance(data, dict):
        raise FaultConfigError("the fault configuration must be a JSON object")
    unknown = set(data) - set(_FIELDS)
    if unknown:
        raise FaultConfigError(f"unknown fault fields: {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "error_rate" in data:
        rates = data["error_rate"] or {}
        if not isinstance(rates, dict):
            raise FaultConfigError("error_rate must map status codes to probabilities")
        out["error_rate"] = {}
        for status, rate in rates.items():
            if not str(status).isdigit() or not 400 <= int(status) <= 599:
                raise FaultConfigError(f"error_rate key {status!r} is not an HTTP error status")
            out["error_rate"][str(int(status))] = _number({"r": rate}, "r")
        if sum(out["error_rate"].values()) > 1.0:
            raise FaultConfigError("error_rate probabilities add up to more than 1")
    if "crash_after_tokens" in data:
        value = data["crash_after_tokens"]
        out["crash_after_tokens"] = (
            None if value is None else int(_number(data, "crash_after_tokens"))
        )
    for key in ("stall_seconds", "first_byte_delay_seconds"):
        if key in data:
            out[key] = _number(data, key) if data[key] is not None else 0.0
    if "stall_after_tokens" in data:
        out["stall_after_tokens"] = int(
            _number(data, "stall_after_tokens") if data["stall_after_tokens"] is not None else 0
        )
    if "legacy_errors" in data:
        out["legacy_errors"] = bool(data["legacy_errors"])
    if "fail_next" in data:
        entries = data["fail_next"] or []
        if not isinstance(entries, list):
            raise FaultConfigError("fail_next must be a list")
        out["fail_next"] = [_validate_entry(e) for e in entries]
    return out


def _same_model(wanted: str, model: str) -> bool:
    left, right = parse_model_name(wanted), parse_model_name(model)
    return left is not None and right is not None and left.short == right.short


class Faults:
    """The live fault configuration; ``plan()`` draws the faults for one request."""

    def __init__(self, seed: int = 0, initial: dict[str, Any] | None = None) -> None:
        self._seed = seed
        self._rng = random.Random(seed)
        self._config = _empty()
        if initial:
            self.replace(initial)

    def snapshot(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def replace(self, data: Any) -> None:
        """``PUT``: the given fields over an empty configuration."""
        self._config = {**_empty(), **validate(data)}

    def merge(self, data: Any) -> None:
        """``POST``: rates merge by status, ``fail_next`` grows, other fields are replaced."""
        update = validate(data)
        if "error_rate" in update:
            rates = {**self._config["error_rate"], **update.pop("error_rate")}
            if sum(rates.values()) > 1.0:
                raise FaultConfigError("error_rate probabilities add up to more than 1")
            self._config["error_rate"] = rates
        if "fail_next" in update:
            self._config["fail_next"].extend(update.pop("fail_next"))
        self._config.update(update)

    def clear(self) -> None:
        self._config = _empty()
        self._rng = random.Random(self._seed)

    def plan(self, endpoint: str, model: str, text: str = "") -> FaultPlan:
        """Draw the faults for one generate, chat or embed request (consumes one-shots);
        ``text`` is what the request sent to the model (prompt, messages or input)."""
        config = self._config
        plan = FaultPlan(legacy=config["legacy_errors"])
        if endpoint in ("generate", "chat"):
            self._apply_one_shot(plan, model, text)
            if plan.crash_after is None and config["crash_after_tokens"] is not None:
                plan.crash_after = config["crash_after_tokens"]
                plan.applied.append("crash_after")
            if not plan.stall_s and config["stall_seconds"]:
                plan.stall_s = config["stall_seconds"]
                plan.stall_after = config["stall_after_tokens"]
                plan.applied.append("stall")
        else:  # embed: no stream to crash, stall or cut; a one-shot status still applies
            self._apply_one_shot(plan, model, text, types=("status",))
        if plan.status is None and not plan.close and config["error_rate"]:
            roll = self._rng.random()
            for status, rate in sorted(config["error_rate"].items()):
                if roll < rate:
                    plan.status, plan.error = int(status), status_message(int(status))
                    plan.applied.append(f"status_{status}")
                    break
                roll -= rate
        if config["first_byte_delay_seconds"]:
            plan.first_byte_delay_s = config["first_byte_delay_seconds"]
            plan.applied.append("first_byte_delay")
        return plan

    def _apply_one_shot(
        self, plan: FaultPlan, model: str, text: str, types: tuple[str, ...] = _FAIL_TYPES
    ) -> None:
        queue: list[dict[str, Any]] = self._config["fail_next"]
        for index, entry in enumerate(queue):
            if "model" in entry and not _same_model(entry["model"], model):
                continue
            if entry.get("prompt_contains", "") not in text:
                continue
            if entry["type"] not in types:
                continue
            del queue[index]
            kind = entry["type"]
            if kind == "status":
                plan.status = entry["status"]
                plan.error = entry.get("error") or status_message(entry["status"])
                plan.applied.append(f"status_{plan.status}")
            elif kind == "crash_after":
                plan.crash_after = entry["tokens"]
                plan.applied.append("crash_after")
            elif kind == "stall":
                plan.stall_s, plan.stall_after = entry["seconds"], entry["after_tokens"]
                plan.applied.append("stall")
            elif kind == "invalid_format":
                plan.invalid_format = True
                plan.applied.append("invalid_format")
            else:
                plan.close = True
                plan.applied.append("close")
            return
