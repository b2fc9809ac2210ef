"""The event vocabulary of a task stream, shared by workers, producers, gateway and exporter.

Events are JSON objects ``{"task_id", "seq", "type", ...data}`` with ``seq`` 0, 1, 2... and no
gaps. Exactly one terminal event (``done``, ``error`` or ``cancelled``) ends every stream.

A ``queued`` event (``position``, ``eta_s``) is the one exception: a follower makes it from the
scheduler's position while the task waits, and it is never written to the log. It carries
``seq`` -1, since it comes before event 0 and advances nothing: resuming after it replays from
the start (docs/scheduling.md, "Queued events").
"""

from __future__ import annotations

from typing import Any

TERMINAL_TYPES = frozenset({"done", "error", "cancelled"})
TEXT_TYPES = frozenset({"token", "thinking"})
ATTEMPT_TYPES = frozenset({"start", "restart"})  # a new attempt's text begins after these
ABANDONED_ERROR = "BrokerUnavailable"  # the stream ended early; the result comes later
QUEUED = "queued"  # where a waiting task stands; made by followers, not in the log
QUEUED_SEQ = -1


def is_abandoned(event: dict[str, Any]) -> bool:
    """An ``error`` event saying the stream was cut by lost Redis, not that the task failed."""
    error = event.get("error") or {}
    return event.get("type") == "error" and error.get("type") == ABANDONED_ERROR


def queued_event(task_id: str, position: int, eta_s: float | None) -> dict[str, Any]:
    """The ``queued`` event of a task waiting ``position`` places back (ETA to 0.1 s)."""
    eta = None if eta_s is None else round(eta_s, 1)
    return {
        "task_id": task_id,
        "seq": QUEUED_SEQ,
        "type": QUEUED,
        "position": position,
        "eta_s": eta,
    }
