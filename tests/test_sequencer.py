"""The event sequencer on its own: log entries and live messages in, events out, no Redis."""

from __future__ import annotations

import json
from typing import Any

from tasks.sequencer import Sequencer

TASK = "t-1"


def event(seq: int, kind: str = "token") -> dict[str, Any]:
    return {"task_id": TASK, "seq": seq, "type": kind, "text": f"t{seq}"}


def entries(*events: dict[str, Any], first_id: int = 1) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Replay-log entries as XRANGE returns them."""
    return [
        (f"{first_id + i}-0".encode(), {b"e": json.dumps(e).encode()}) for i, e in enumerate(events)
    ]


def live(order: Sequencer, *events: dict[str, Any]) -> list[dict[str, Any] | None]:
    return [order.live(json.dumps(e).encode()) for e in events]


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def test_log_then_live_in_order_without_duplicates() -> None:
    order = Sequencer(TASK)
    assert seqs(order.replay(entries(event(0, "start"), event(1)))) == [0, 1]
    assert order.log_from == "(2-0"  # the next log read starts after the last entry read
    # published while the log was read: seen twice, given once
    assert live(order, event(1), event(2), event(2), event(3)) == [None, event(2), None, event(3)]
    assert order.expected == 4 and not order.gap and not order.ended


def test_a_duplicate_in_the_log_is_dropped() -> None:
    order = Sequencer(TASK)
    assert seqs(order.replay(entries(event(0), event(1), event(1), event(2)))) == [0, 1, 2]


def test_a_live_gap_is_filled_from_the_log() -> None:
    order = Sequencer(TASK)
    order.replay(entries(event(0, "start")))
    assert live(order, event(1)) == [event(1)]
    assert live(order, event(3)) == [None] and order.gap  # seq 2 was lost
    assert seqs(order.replay(entries(event(1), event(2), event(3), first_id=2))) == [2, 3]
    assert not order.gap
    assert live(order, event(3), event(4)) == [None, event(4)]


def test_the_terminal_event_ends_the_stream() -> None:
    order = Sequencer(TASK)
    given = order.replay(entries(event(0, "start"), event(1, "done"), event(2, "token")))
    assert seqs(given) == [0, 1] and order.ended
    assert live(order, event(2), event(5)) == [None, None] and not order.gap

    from_live = Sequencer(TASK)
    start, error = event(0, "start"), event(1, "error")
    assert live(from_live, start, error) == [start, error]
    assert from_live.ended


def test_resume_after_a_given_seq() -> None:
    order = Sequencer(TASK, after_seq=1)
    log = entries(event(0, "start"), event(1), event(2), event(3, "cancelled"))
    assert seqs(order.replay(log)) == [2, 3] and order.ended
    resumed = Sequencer(TASK, after_seq=4)
    assert live(resumed, event(4), event(5)) == [None, event(5)]


def test_an_ended_task_yields_the_rest_of_its_log_not_the_stand_in() -> None:
    order = Sequencer(TASK)
    order.replay(entries(event(0, "start")))
    outcome = {"type": "done", "result": {"from": "backend"}}
    rest = order.conclude(entries(event(1), event(2, "done"), first_id=2), outcome)
    assert rest == [event(1), event(2, "done")] and order.ended


def test_the_outcome_stands_in_for_an_expired_log() -> None:
    order = Sequencer(TASK, after_seq=2)
    outcome = {"type": "cancelled", "reason": "gone"}
    assert order.conclude([], outcome) == [{"task_id": TASK, "seq": 3, **outcome}]
    assert order.ended
    partial = Sequencer(TASK)
    given = partial.conclude(entries(event(0, "start"), event(1)), {"type": "done", "result": {}})
    assert seqs(given) == [0, 1, 2] and given[-1]["type"] == "done"
