"""The event vocabulary of a task stream, shared by workers, producers, gateway and exporter.

Events are JSON objects ``{"task_id", "seq", "type", ...data}`` with ``seq`` 0, 1, 2... and no
gaps. Exactly one terminal event (``done``, ``error`` or ``cancelled``) ends every stream.
"""

from __future__ import annotations

from typing import Any

TERMINAL_TYPES = frozenset({"done", "error", "cancelled"})
TEXT_TYPES = frozenset({"token", "thinking"})
ATTEMPT_TYPES = frozenset({"start", "restart"})  # a new attempt's text begins after these
ABANDONED_ERROR = "BrokerUnavailable"  # the stream ended early; the result comes later


def is_abandoned(event: dict[str, Any]) -> bool:
    """An ``error`` event saying the stream was cut by lost Redis, not that the task failed."""
    error = event.get("error") or {}
    return event.get("type") == "error" and error.get("type") == ABANDONED_ERROR
