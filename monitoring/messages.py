"""Read what a waiting kombu message says about itself, without trusting its shape.

kombu's Redis transport stores each message as JSON: ``headers`` (Celery's protocol 2: task name,
id, eta...), ``properties`` and a ``body`` that is base64 of ``[args, kwargs, embed]``. Our
producers put ``submitted_at`` (Unix seconds) in the kwargs; a message sent some other way may
lack it, and then the caller falls back to when it first saw the message.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WaitingMessage:
    task_id: str | None
    task_name: str | None
    submitted_at: float | None


def parse_message(raw: bytes | str | None) -> WaitingMessage | None:
    """The id, name and submission time of one raw message (None if it is not a kombu message)."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(message, dict):
        return None
    headers = _dict(message.get("headers"))
    task_id = headers.get("id")
    name = headers.get("task")
    return WaitingMessage(
        task_id=task_id if isinstance(task_id, str) else None,
        task_name=name if isinstance(name, str) else None,
        submitted_at=_submitted_at(message),
    )


def _submitted_at(message: dict[str, Any]) -> float | None:
    body = message.get("body")
    properties = _dict(message.get("properties"))
    if not isinstance(body, str):
        return None
    try:
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True).decode()
        decoded = json.loads(body)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    if not (isinstance(decoded, list) and len(decoded) >= 2 and isinstance(decoded[1], dict)):
        return None
    value = decoded[1].get("submitted_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
