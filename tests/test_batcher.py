"""The batcher alone: requests of many threads gathered into calls, in order, per key and lane.

A call is a function that blocks until the test lets it return, so what gathers while a call is
in flight is decided by the test, not by timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from workers.batcher import Batcher, Share, Work

WAIT_S = 10.0


class Calls:
    """A ``send`` that records each call's items and returns only when released."""

    def __init__(self, fail: Callable[[list[str]], BaseException | None] = lambda items: None):
        self.items: list[list[str]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail = fail

    def send(self, items: list[str]) -> tuple[list[str], Any]:
        self.items.append(list(items))
        self.started.release()
        assert self.release.acquire(timeout=WAIT_S), "the test never released the call"
        error = self.fail(items)
        if error is not None:
            raise error
        return [item.upper() for item in items], {"size": len(items)}

    def wait_started(self) -> None:
        assert self.started.acquire(timeout=WAIT_S), "no call was made"


class Caller(threading.Thread):
    """One task's thread: gathers its parts and keeps the outcome."""

    def __init__(
        self,
        batcher: Batcher,
        work: Work[str, str],
        *parts: list[str],
        check: Callable[[], None] = lambda: None,
        poll_s: float = 0.01,
        wake: threading.Event | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.batcher, self.work, self.parts, self.check = batcher, work, list(parts), check
        self.poll_s, self.wake = poll_s, wake
        self.outcomes: list[Share[str, str] | BaseException] = []
        self.raised: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.outcomes = self.batcher.gather(
                self.work, self.parts, self.check, poll_s=self.poll_s, wake=self.wake
            )
        except BaseException as exc:  # noqa: BLE001  # kept for the test to look at
            self.raised = exc

    def results(self) -> list[str]:
        self.join(WAIT_S)
        assert not self.is_alive() and self.raised is None
        shares = [outcome for outcome in self.outcomes if isinstance(outcome, Share)]
        return [result for share in shares for result in share.results]


@pytest.fixture
def calls() -> Iterator[Calls]:
    calls = Calls()
    yield calls
    for _ in range(20):
        calls.release.release()  # nothing stays blocked after a failed test


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_requests_gather_while_a_call_is_in_flight(calls: Calls) -> None:
    batcher = Batcher(max_items=4)
    work = Work(lane="m", key="k", send=calls.send)
    first = Caller(batcher, work, ["a"])
    calls.wait_started()  # the lone request went out at once
    waiting = [
        Caller(batcher, work, ["b"]),
        Caller(batcher, work, ["c", "d"]),
        Caller(batcher, work, ["e", "f"]),
    ]
    wait_until(lambda: batcher.waiting("m") == 3)
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    assert first.results() == ["A"]
    assert [caller.results() for caller in waiting] == [["B"], ["C", "D"], ["E", "F"]]
    # "e, f" did not fit beside "b" and "c, d" (4 items at most): it went in the next call
    assert calls.items == [["a"], ["b", "c", "d"], ["e", "f"]]


def test_only_requests_with_the_same_key_share_a_call(calls: Calls) -> None:
    batcher = Batcher(max_items=10)
    plain = Work(lane="m", key="plain", send=calls.send)
    short = Work(lane="m", key="short", send=calls.send)
    blocker = Caller(batcher, plain, ["0"])
    calls.wait_started()
    callers = [
        Caller(batcher, short, ["s1"]),
        Caller(batcher, plain, ["p1"]),
        Caller(batcher, short, ["s2"]),
    ]
    wait_until(lambda: batcher.waiting("m") == 3)
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    assert blocker.results() == ["0"]
    assert [c.results() for c in callers] == [["S1"], ["P1"], ["S2"]]
    assert calls.items == [["0"], ["s1", "s2"], ["p1"]]  # the oldest request's key goes first


def test_each_part_is_a_request_of_its_own(calls: Calls) -> None:
    batcher = Batcher(max_items=2)
    work = Work(lane="m", key="k", send=calls.send)
    caller = Caller(batcher, work, ["a", "b"], ["c", "d"], ["e"])
    for _ in range(3):
        calls.wait_started()
        calls.release.release()
    assert caller.results() == ["A", "B", "C", "D", "E"]
    assert calls.items == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="more than max_items"):
        batcher.gather(work, [["a", "b", "c"]])


def test_a_failure_that_belongs_to_one_request_fails_only_that_one() -> None:
    calls = Calls(fail=lambda items: ValueError("too long") if "bad" in items else None)
    batcher = Batcher(max_items=10)
    work = Work(lane="m", key="k", send=calls.send, isolate=lambda e: isinstance(e, ValueError))
    blocker = Caller(batcher, work, ["0"])
    calls.wait_started()
    good = Caller(batcher, work, ["x"])
    bad = Caller(batcher, work, ["bad"])
    other = Caller(batcher, work, ["y"])
    wait_until(lambda: batcher.waiting("m") == 3)
    for _ in range(5):  # the blocker, the shared call, then each request alone
        calls.release.release()
    assert blocker.results() == ["0"] and good.results() == ["X"] and other.results() == ["Y"]
    bad.join(WAIT_S)
    assert isinstance(bad.outcomes[0], ValueError)
    assert calls.items == [["0"], ["x", "bad", "y"], ["x"], ["bad"], ["y"]]


def test_a_failure_of_the_call_reaches_every_request() -> None:
    calls = Calls(fail=lambda items: RuntimeError("server busy") if len(items) > 1 else None)
    batcher = Batcher(max_items=10)
    work = Work(lane="m", key="k", send=calls.send, isolate=lambda e: isinstance(e, ValueError))
    blocker = Caller(batcher, work, ["0"])
    calls.wait_started()
    callers = [Caller(batcher, work, [name]) for name in ("a", "b")]
    wait_until(lambda: batcher.waiting("m") == 2)
    calls.release.release()
    calls.release.release()
    assert blocker.results() == ["0"]
    for caller in callers:
        caller.join(WAIT_S)
        assert isinstance(caller.outcomes[0], RuntimeError)
    assert calls.items == [["0"], ["a", "b"]]  # not isolated: one call, one failure for all


def test_a_caller_that_stops_waiting_leaves_the_queue(calls: Calls) -> None:
    batcher = Batcher(max_items=10)
    work = Work(lane="m", key="k", send=calls.send)
    blocker = Caller(batcher, work, ["0"])
    calls.wait_started()
    stop = threading.Event()

    def check() -> None:
        if stop.is_set():
            raise TimeoutError("cancelled")

    leaving = Caller(batcher, work, ["gone"], check=check)
    staying = Caller(batcher, work, ["kept"])
    wait_until(lambda: batcher.waiting("m") == 2)
    stop.set()
    leaving.join(WAIT_S)
    assert isinstance(leaving.raised, TimeoutError) and batcher.waiting("m") == 1
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    assert blocker.results() == ["0"] and staying.results() == ["KEPT"]
    assert calls.items == [["0"], ["kept"]]


def test_lanes_call_independently(calls: Calls) -> None:
    batcher = Batcher(max_items=10)
    first = Caller(batcher, Work(lane="m1", key="k", send=calls.send), ["a"])
    calls.wait_started()
    second = Caller(batcher, Work(lane="m2", key="k", send=calls.send), ["b"])
    calls.wait_started()  # m2 did not wait for m1's call
    calls.release.release()
    calls.release.release()
    assert first.results() == ["A"] and second.results() == ["B"]


def test_a_waiting_caller_sleeps_until_its_call_returns_or_it_is_woken(calls: Calls) -> None:
    """No poll: a caller whose poll is an hour away still gets its share when its call returns,
    and leaves at once when its wake event is set and its check then raises."""
    batcher = Batcher(max_items=10)
    work = Work(lane="m", key="k", send=calls.send)
    blocker = Caller(batcher, work, ["0"], poll_s=3600)
    calls.wait_started()
    stop, wake = threading.Event(), threading.Event()
    checks = []

    def check() -> None:
        checks.append(time.monotonic())
        if stop.is_set():
            raise TimeoutError("cancelled")

    leaving = Caller(batcher, work, ["gone"], check=check, poll_s=3600, wake=wake)
    staying = Caller(batcher, work, ["kept"], poll_s=3600)
    wait_until(lambda: batcher.waiting("m") == 2 and len(checks) == 1)
    stop.set()
    wake.set()  # what a cancel does: the caller runs its check now, not in an hour
    leaving.join(WAIT_S)
    assert isinstance(leaving.raised, TimeoutError) and len(checks) == 2
    calls.release.release()
    calls.wait_started()
    calls.release.release()
    assert blocker.results() == ["0"] and staying.results() == ["KEPT"]
    assert calls.items == [["0"], ["kept"]]
