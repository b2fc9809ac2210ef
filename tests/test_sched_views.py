"""What a waiting task's caller sees: ``job.position()``, ``job.eta()``, ``queued`` events.

The tasks wait in the scheduler (admitted as the SDK builds them: tests/sched_support.py); the
tests release and start them with the scheduler's own calls, so every position is exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sched_support import MODEL, admit_task, sdk_fixture, wait_until  # noqa: F401
from test_gateway_support import GatewayServer, read_sse

from producers import Client
from tasks.errors import TaskNotFound
from tasks.events import QUEUED_SEQ
from tasks.keys import SCHED_PREFIX
from tasks.scheduler import Scheduler
from tasks.scheduler.views import QueuedNotices, Wait

TIMEOUT = (5, 30)


def scheduler(client: Client) -> Scheduler:
    return Scheduler(client.redis, client.settings)


def start_next(sched: Scheduler, count: int) -> list[str]:
    """Release ``count`` tasks and start them, as a worker would."""
    released = sched.release(MODEL, count)
    for task_id in released:
        assert sched.started(task_id)
    return released


# -- job.position() and job.eta() -------------------------------------------------------------
def test_position_and_eta_of_waiting_tasks(sdk: Client) -> None:
    sched = scheduler(sdk)
    sched.finished("earlier", MODEL, run_s=10.0)  # the model's measured run time: 10 s
    batch = [admit_task(sdk, priority=5) for _ in range(3)]
    urgent = admit_task(sdk, priority=9)
    jobs = [urgent, *batch]
    assert [job.position() for job in jobs] == [0, 1, 2, 3]
    # Two slots, both free: the first two start at once; then one slot frees every 10 / 2 s.
    assert [job.eta() for job in jobs] == [0.0, 0.0, 5.0, 10.0]
    assert start_next(sched, 2) == [urgent.id, batch[0].id]
    assert urgent.position() is None and urgent.eta() is None  # started
    assert [batch[1].wait(), batch[2].wait()] == [Wait(MODEL, 0, 5.0), Wait(MODEL, 1, 10.0)]
    sched.finished(urgent.id, MODEL, run_s=20.0)  # mean 0.2 × 20 + 0.8 × 10 = 12 s
    assert (batch[1].position(), batch[1].eta()) == (0, 0.0)  # a slot is free now
    assert (batch[2].position(), batch[2].eta()) == (1, pytest.approx(6.0))


def test_no_eta_before_a_run_time_or_without_a_worker(sdk: Client) -> None:
    job = admit_task(sdk)
    assert (job.position(), job.eta()) == (0, None)  # nothing measured yet
    other = admit_task(sdk, model="nobody-serves:latest")
    scheduler(sdk).finished("earlier", "nobody-serves:latest", run_s=3.0)
    assert (other.position(), other.eta()) == (0, None)  # no live slot to estimate with


def test_position_of_an_unknown_or_unscheduled_task(sdk: Client) -> None:
    with pytest.raises(TaskNotFound):
        sdk.job("never-submitted").position()
    job = admit_task(sdk)
    scheduler(sdk).cancel(job.id)  # no longer in the scheduler; its record remains
    assert job.position() is None and job.eta() is None


# -- queued events ---------------------------------------------------------------------------
def test_notices_come_at_most_once_a_second_and_only_on_change() -> None:
    notices = QueuedNotices("t", every_s=1.0)
    assert notices.due(100.0)
    first = notices.take(Wait(MODEL, 3, 12.04), 100.0)
    assert first == {
        "task_id": "t",
        "seq": QUEUED_SEQ,
        "type": "queued",
        "position": 3,
        "eta_s": 12.0,
    }
    assert not notices.due(100.5)
    assert notices.due(101.0) and notices.take(Wait(MODEL, 3, 12.01), 101.0) is None  # same
    moved = notices.take(Wait(MODEL, 2, 8.0), 102.0)
    assert moved is not None and (moved["position"], moved["eta_s"]) == (2, 8.0)
    assert notices.take(None, 103.0) is None and not notices.due(1e9)  # started: no more
    released = QueuedNotices("t", every_s=1.0)
    assert released.take(Wait(MODEL, 4, 8.0), 100.0) is not None
    # Released to Celery's queue: a free slot takes it next, nothing more to say.
    assert released.take(Wait(MODEL, 0, 0.0, released=True), 101.0) is None
    assert not released.due(1e9)


def follow(job: Any, seen: list[tuple[float, dict[str, Any]]]) -> threading.Thread:
    def run() -> None:
        for event in job.stream(timeout=60):
            seen.append((time.monotonic(), event))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_queued_events_while_waiting_and_none_in_the_log(sdk: Client) -> None:
    sched = scheduler(sdk)
    sched.finished("earlier", MODEL, run_s=4.0)
    jobs = [admit_task(sdk) for _ in range(4)]
    watched = jobs[-1]
    seen: list[tuple[float, dict[str, Any]]] = []
    reader = follow(watched, seen)
    wait_until(lambda: seen, what="the first queued event")
    # Three tasks before it; two free slots take two at once, then one frees every 2 s.
    assert seen[0][1] == {
        "task_id": watched.id,
        "seq": -1,
        "type": "queued",
        "position": 3,
        "eta_s": 4.0,
    }
    start_next(sched, 1)
    wait_until(lambda: len(seen) >= 2, what="the queued event after a start")
    assert (seen[1][1]["position"], seen[1][1]["eta_s"]) == (2, 4.0)
    assert seen[1][0] - seen[0][0] >= 0.9  # at most once a second
    watched.cancel()
    reader.join(30)
    assert [event["type"] for _, event in seen] == ["queued", "queued", "cancelled"]
    # The log holds the task's own events only: a replay has no queued event, seq from 0.
    assert list(watched.stream(timeout=10)) == [seen[-1][1]]
    assert seen[-1][1]["seq"] == 0


@pytest.mark.usefixtures("worker")
def test_a_waiting_task_runs_and_its_replay_is_exact(client: Client, sim) -> None:
    """Released to a real worker: the queued events, then the task's own, seq 0, 1, 2..."""
    model = "llama3.2:latest"
    sched = Scheduler(client.redis, client.settings)
    try:
        ahead = admit_task(client, model=model)
        job = admit_task(client, model=model)
        events = job.stream(timeout=60)
        first = next(events)
        assert (first["type"], first["seq"], first["position"]) == ("queued", -1, 1)
        assert sched.release(model, 2) == [ahead.id, job.id]
        rest = list(events)
        own = [event for event in rest if event["type"] != "queued"]
        assert [event["seq"] for event in own] == list(range(len(own)))
        assert own[0]["type"] == "start" and own[-1]["type"] == "done"
        assert list(job.stream(timeout=10)) == own  # the replay: exactly the log
        assert ahead.result(timeout=60).metrics.eval_count == 4
    finally:
        for key in client.redis.scan_iter(match=f"{SCHED_PREFIX}:*"):
            client.redis.delete(key)


# -- the CLI ---------------------------------------------------------------------------------
def test_corral_stream_shows_the_place_in_line(sdk: Client) -> None:
    scheduler(sdk).finished("earlier", MODEL, run_s=80.0)
    for _ in range(2):
        admit_task(sdk)
    job = admit_task(sdk)
    env = {**os.environ, "CORRAL_REDIS_URL": sdk.settings.redis_url}
    child = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "stream", job.id],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        line = child.stderr.readline()  # the first line (pytest-timeout bounds the wait)
        assert line == "queued: position 2, starts in ~40 s\n"
        job.cancel()
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 1 and "cancelled before it started" in err


# -- the gateway -----------------------------------------------------------------------------
@pytest.fixture
def gateway(sdk: Client) -> Iterator[str]:
    """A gateway on the database of ``sdk``."""
    with GatewayServer(sdk.settings) as server:
        yield server.url


def test_task_status_carries_position_and_eta(sdk: Client, gateway: str) -> None:
    scheduler(sdk).finished("earlier", MODEL, run_s=6.0)
    jobs = [admit_task(sdk) for _ in range(3)]
    reply = requests.get(f"{gateway}/v1/tasks/{jobs[2].id}", timeout=TIMEOUT)
    body = reply.json()
    assert (body["status"], body["position"], body["eta_s"]) == ("queued", 2, 3.0)
    assert reply.headers["X-Corral-Queue-Position"] == "2"
    start_next(scheduler(sdk), 1)
    body = requests.get(f"{gateway}/v1/tasks/{jobs[0].id}", timeout=TIMEOUT).json()
    assert "position" not in body and "eta_s" not in body  # started: no place in line
    body = requests.get(f"{gateway}/v1/tasks/{jobs[2].id}", timeout=TIMEOUT).json()
    assert (body["position"], body["eta_s"]) == (1, 3.0)


def test_event_stream_carries_queued_events(sdk: Client, gateway: str) -> None:
    scheduler(sdk).finished("earlier", MODEL, run_s=6.0)
    admit_task(sdk)
    job = admit_task(sdk)
    url = f"{gateway}/v1/tasks/{job.id}/events"
    with requests.get(url, stream=True, timeout=TIMEOUT) as stream:
        [queued] = read_sse(stream, stop_after=1)
    # Not in the log: no id, so that Last-Event-ID stays where the task's own events left it.
    assert "id" not in queued and queued["event"] == "queued"
    assert queued["data"] == {
        "task_id": job.id,
        "seq": -1,
        "type": "queued",
        "position": 1,
        "eta_s": 0.0,
    }
    requests.delete(f"{gateway}/v1/tasks/{job.id}", timeout=TIMEOUT).raise_for_status()
    with requests.get(url, headers={"Last-Event-ID": "-1"}, stream=True, timeout=TIMEOUT) as again:
        assert [(e["id"], e["event"]) for e in read_sse(again)] == [("0", "cancelled")]
