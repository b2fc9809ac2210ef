"""Put a task's events in order from its replay log and its live channel, without any I/O.

A follower subscribes first, then reads the log, then takes live messages (the other order
loses what is published in between). Both followers (the SDK's, threaded, and the gateway's,
asyncio) feed what they read to a :class:`Sequencer` and only do the I/O around it:

- :meth:`Sequencer.replay` takes log entries (as ``XRANGE`` returns them) and gives the events
  not yet yielded; :attr:`Sequencer.log_from` is where the next log read starts;
- :meth:`Sequencer.live` takes one pub/sub message body and gives its event if it is the next
  one; a later ``seq`` sets :attr:`Sequencer.gap` (a message was lost: read the log again);
- :meth:`Sequencer.conclude` ends a stream whose task has ended (seen in the result backend):
  the rest of the log, else the stored outcome as the terminal event;
- :attr:`Sequencer.ended` says the terminal event has been given: stop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from tasks.events import TERMINAL_TYPES

LOG_FIELD = b"e"  # the field of a replay-log entry that holds the event's JSON

LogEntry = tuple[bytes | str, Mapping[bytes, bytes]]


class Sequencer:
    """One task's events in ``seq`` order, each once, ending with its terminal event."""

    def __init__(self, task_id: str, after_seq: int = -1) -> None:
        self.task_id = task_id
        self.expected = after_seq + 1  # the next seq to give
        self.log_from = "-"  # XRANGE min of the next log read: after the last entry read
        self.gap = False
        self.ended = False

    def replay(self, entries: Iterable[LogEntry]) -> list[dict[str, Any]]:
        """The events of these log entries not given yet, up to the terminal one."""
        events = []
        self.gap = False  # the log holds whatever the live feed missed
        for entry_id, fields in entries:
            if self.ended:
                break
            self.log_from = "(" + (entry_id.decode() if isinstance(entry_id, bytes) else entry_id)
            event = self._take(orjson.loads(fields[LOG_FIELD]))
            if event is not None:
                events.append(event)
        return events

    def live(self, data: bytes | str) -> dict[str, Any] | None:
        """The event of a pub/sub message if it is the next one; None for one already given,
        or for one past the next (then :attr:`gap` is set: read the log before going on)."""
        event = orjson.loads(data)
        if self.ended or event["seq"] < self.expected:
            return None  # already given from the log, or after the end
        if event["seq"] > self.expected:
            self.gap = True
            return None
        return self._take(event)

    def conclude(
        self, entries: Iterable[LogEntry], outcome: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """The task has ended with ``outcome`` (a terminal event without ``task_id``/``seq``).

        Its terminal event reaches the log before the result backend, so ``entries`` (the log
        read after the outcome was seen) hold the rest of the stream; the outcome only stands
        in for a log that has expired.
        """
        events = self.replay(entries)
        if not self.ended:
            events.append({"task_id": self.task_id, "seq": self.expected, **outcome})
            self.ended = True
        return events

    def _take(self, event: dict[str, Any]) -> dict[str, Any] | None:
        if event["seq"] < self.expected:
            return None  # a duplicate
        self.expected = event["seq"] + 1
        self.ended = event["type"] in TERMINAL_TYPES
        return event
