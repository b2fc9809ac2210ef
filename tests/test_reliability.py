"""Delivery under failure: cancellation, crashes, redelivery, stalls, head-of-line blocking.

These run against a slow simulator (50 tokens/s) in Redis db 1, so that tasks last long enough to
be cancelled or killed, with workers whose visibility timeout and lease are short.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from producers import Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from tasks.app import celery_config
from tasks.errors import TaskCancelled, TaskTimeout
from tasks.keys import KOMBU_UNACKED_MUTEX, lease_key
from tasks.lifecycle import dead_letters
from tasks.settings import load_settings
from tests.conftest import SimControl

WAIT_S = 60
SHORT_DELIVERY = {
    "CORRAL_VISIBILITY_TIMEOUT_S": "2",
    "CORRAL_LEASE_TTL_S": "1.5",
    "CORRAL_STALL_TIMEOUT_S": "1",
    "CORRAL_TASK_ATTEMPTS": "1",
}


class SlowStack:
    def __init__(self, redis_url: str, sim: SimControl, workers: dict[str, Child]) -> None:
        self.redis_url = redis_url
        self.sim = sim
        self.workers = workers


@pytest.fixture(scope="module")
def slow(redis_server, tmp_path_factory) -> Iterator[SlowStack]:
    redis_url = f"redis://{redis_server.host}:{redis_server.port}/1"
    sim_child, sim_url = start_simulator(
        [
            "--tokens-per-second",
            "50",
            "--load-seconds",
            "0.05",
            "--first-token-seconds",
            "0",
            "--num-parallel",
            "4",
        ]
    )
    logs = Path(tmp_path_factory.mktemp("slow-logs"))
    workers = {
        "threads": start_worker(
            ["llama3.2", "qwen2.5-coder:7b"],
            redis_url=redis_url,
            ollama_host=sim_url,
            name="thr@slow",
            log_path=logs / "thr.log",
            env=SHORT_DELIVERY,
        ),
        "prefork": start_worker(
            ["deepseek-r1:14b", "qwen2.5-coder:7b"],
            redis_url=redis_url,
            ollama_host=sim_url,
            pool="prefork",
            name="pre@slow",
            log_path=logs / "pre.log",
            env=SHORT_DELIVERY,
        ),
    }
    yield SlowStack(redis_url, SimControl(sim_url), workers)
    for child in workers.values():
        child.stop()
    sim_child.stop()


@pytest.fixture
def slow_client(slow: SlowStack) -> Iterator[Client]:
    slow.sim.reset()
    with Client(settings=load_settings(redis_url=slow.redis_url)) as client:
        yield client


def wait_for_tokens(job, count: int) -> dict:
    """Follow the stream until ``count`` tokens arrived; return the start event."""
    start, seen = None, 0
    for event in job.stream(timeout=WAIT_S):
        if event["type"] == "start":
            start = event
        seen += event["type"] in ("token", "thinking")
        if seen >= count:
            return start
    raise AssertionError("the stream ended before enough tokens")


@pytest.mark.parametrize(
    ("model", "pool"), [("llama3.2", "threads"), ("deepseek-r1:14b", "prefork")]
)
def test_cancel_running_task_closes_the_ollama_request(
    slow: SlowStack, slow_client: Client, model: str, pool: str
) -> None:
    job = slow_client.generate(model, "a very long essay", options={"num_predict": 2000})
    start = wait_for_tokens(job, 5)
    assert start["worker"] == slow.workers[pool].node_name  # type: ignore[attr-defined]
    since = slow.sim.events()["next"]
    cancelled_at = time.time()
    assert job.cancel() == "running"
    disconnect = slow.sim.wait_for_event("disconnect", timeout_s=10, since=since)
    latency_s = disconnect["t"] - cancelled_at
    assert latency_s < 1.5, f"Ollama saw the close {latency_s:.3f} s after cancel"
    events = list(job.stream(timeout=WAIT_S))
    assert events[-1]["type"] == "cancelled"
    assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1
    tokens = sum(e["type"] in ("token", "thinking") for e in events)
    assert tokens < 2000 * 0.5  # stopped long before the end
    with pytest.raises(TaskCancelled):
        job.result(timeout=WAIT_S)
    assert job.status() == "cancelled"


def test_cancel_during_a_stall_is_prompt(slow: SlowStack, slow_client: Client) -> None:
    """No chunk arrives during a stall: the heartbeat delivers the cancel instead."""
    slow.sim.faults(fail_next=[{"type": "stall", "seconds": 30, "after_tokens": 2}])
    with Client(settings=load_settings(redis_url=slow.redis_url)) as client:
        job = client.generate("llama3.2", "stall me", options={"num_predict": 50})
        wait_for_tokens(job, 2)
        started = time.monotonic()
        job.cancel()
        assert list(job.stream(timeout=WAIT_S))[-1]["type"] in ("cancelled", "error")
        assert time.monotonic() - started < 3


@pytest.mark.timeout(25)
def test_cancel_before_the_first_byte_is_prompt(worker, client: Client, sim: SimControl) -> None:
    """Ollama loads the model or queues the request and has sent nothing yet (30 s here): a
    cancel still ends the task and closes the connection at once."""
    sim.faults(first_byte_delay_seconds=30)
    since = sim.events()["next"]
    job = client.generate("llama3.2", "wait for the first byte", options={"num_predict": 5})
    sim.wait_for_event("request", timeout_s=10, since=since, path="/api/generate")
    cancelled_at = time.time()
    assert job.cancel() == "running"
    events = list(job.stream(timeout=10))
    ended_s = time.time() - cancelled_at
    assert [e["type"] for e in events][-1] == "cancelled"
    assert not any(e["type"] in ("token", "thinking") for e in events)
    assert ended_s < 1.0, f"the cancelled event came {ended_s:.3f} s after cancel"
    disconnect = sim.wait_for_event("disconnect", timeout_s=5, since=since)
    closed_s = disconnect["t"] - cancelled_at
    assert closed_s < 1.0, f"Ollama saw the close {closed_s:.3f} s after cancel"
    with pytest.raises(TaskCancelled):
        job.result(timeout=10)


def test_cancel_queued_task_never_runs(
    slow: SlowStack, slow_client: Client, tmp_path: Path
) -> None:
    job = slow_client.generate("llava:7b", "nobody serves me yet")
    assert job.status() == "queued"
    first = job.cancel()
    assert first == "cancelled" and not first.ended
    with pytest.raises(TaskCancelled):
        job.result(timeout=5)
    assert [e["type"] for e in job.stream(timeout=5)] == ["cancelled"]

    def posts() -> int:  # calls that run a model (the workers also read /api/ps and /api/tags)
        return sum(n for name, n in slow.sim.stats()["requests"].items() if name.startswith("POST"))

    before = posts()
    late = start_worker(
        ["llava:7b"],
        redis_url=slow.redis_url,
        ollama_host=slow.sim.url,
        name="late@slow",
        log_path=tmp_path / "late.log",
    )
    try:
        deadline = time.monotonic() + 20
        while slow_client.redis.llen("corral.llava:7b") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow_client.redis.llen("corral.llava:7b") == 0
        # the worker took it and dropped it: still exactly one event, and Ollama never called
        ping = slow_client.generate("llava:7b", "after", options={"num_predict": 2})
        ping.result(timeout=WAIT_S)
        assert [e["type"] for e in job.stream(timeout=5)] == ["cancelled"]
        assert slow.sim.stats()["requests"].get("POST /api/generate", 0) <= 1
        assert posts() - before <= 1  # the ping's
    finally:
        late.stop()


def test_a_start_that_finds_another_lease_drops_its_request_and_runs_once(
    slow: SlowStack, slow_client: Client, tmp_path: Path
) -> None:
    """A first delivery sends its start step and then its request to Ollama, before the step's
    answer. When the step finds the task leased by another delivery, nothing of the request
    reaches the stream: the delivery waits for that lease to end, then runs the task once."""
    job = slow_client.generate("llava:7b", "after the other one", options={"num_predict": 3})
    assert job.status() == "queued"
    slow_client.redis.set(lease_key(job.id), "another-delivery", px=4000)  # outlives the start
    log = tmp_path / "ahead.log"
    late = start_worker(
        ["llava:7b"],
        redis_url=slow.redis_url,
        ollama_host=slow.sim.url,
        name="ahead@slow",
        log_path=log,
        loglevel="INFO",
    )
    try:
        result = job.result(timeout=WAIT_S)
    finally:
        late.stop()
    events = list(job.stream(timeout=5))
    kinds = [e["type"] for e in events]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert kinds[0] == "start" and kinds.count("start") == 1
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert result.metrics.eval_count == 3
    stats = slow.sim.stats()
    assert stats["requests"]["POST /api/generate"] == 2  # the one sent ahead, then the run's
    assert stats["client_disconnects"] >= 1 and stats["generations_completed"] == 1
    assert f"task {job.id} was not started (leased); starting it again in order" in log.read_text()


def test_a_second_cancel_keeps_the_first_outcome(slow: SlowStack, slow_client: Client) -> None:
    """Cancelled while generating, then cancelled again: the second answer is the state the
    task ended in, and nothing is rewritten."""
    job = slow_client.generate("llama3.2", "a very long essay", options={"num_predict": 2000})
    wait_for_tokens(job, 3)
    assert job.cancel() == "running"
    assert list(job.stream(timeout=WAIT_S))[-1]["type"] == "cancelled"
    deadline = time.monotonic() + WAIT_S  # the worker stores its outcome after the event
    while slow_client.backend.get_task_meta(job.id)["status"] != "FAILURE":
        assert time.monotonic() < deadline, "the worker never stored the outcome"
        time.sleep(0.05)
    again = job.cancel()
    with pytest.raises(TaskCancelled, match="cancelled while calling Ollama"):
        job.result(timeout=WAIT_S)
    assert job.status() == "cancelled"
    assert again == "cancelled" and again.ended
    events = list(job.stream(timeout=WAIT_S))
    assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1


def test_stall_fails_with_task_timeout_and_dead_letter(
    slow: SlowStack, slow_client: Client
) -> None:
    slow.sim.faults(fail_next=[{"type": "stall", "seconds": 20, "after_tokens": 3}])
    job = slow_client.generate("llama3.2", "stall me", options={"num_predict": 20})
    wait_for_tokens(job, 3)
    started = time.monotonic()
    with pytest.raises(TaskTimeout):
        job.result(timeout=WAIT_S)
    assert time.monotonic() - started < 1 + 2.0  # the 1 s stall timeout, plus slack
    letters = {r["task_id"]: r for r in dead_letters(slow_client.redis)}
    assert letters[job.id]["error"]["type"] == "TaskTimeout"
    assert letters[job.id]["payload"]["prompt"] == "stall me"


def test_long_task_outliving_visibility_timeout_runs_once(
    slow: SlowStack, slow_client: Client
) -> None:
    # 250 tokens at 50/s: 5 s, more than twice the 2 s visibility timeout of these workers
    job = slow_client.generate("qwen2.5-coder:7b", "long", options={"num_predict": 250})
    result = job.result(timeout=WAIT_S)
    events = list(job.stream())
    assert [e["type"] for e in events].count("start") == 1
    assert result.metrics.eval_count == 250
    assert slow.sim.stats()["generations_started"] == 1


def test_short_task_is_not_stuck_behind_a_long_one(slow: SlowStack, slow_client: Client) -> None:
    long_job = slow_client.generate("qwen2.5-coder:7b", "long", options={"num_predict": 250})
    wait_for_tokens(long_job, 1)
    short = slow_client.generate("qwen2.5-coder:7b", "short", options={"num_predict": 2})
    short.result(timeout=WAIT_S)
    assert long_job.status() == "running"  # the short one went to the other, idle worker
    long_job.result(timeout=WAIT_S)


@pytest.mark.parametrize("sweeper_died", [False, True], ids=["plain", "sweeper-died-with-lock"])
def test_killed_worker_task_is_redelivered_and_finished_once(
    slow: SlowStack, slow_client: Client, tmp_path: Path, sweeper_died: bool
) -> None:
    env = dict(SHORT_DELIVERY, CORRAL_VISIBILITY_TIMEOUT_S="3", CORRAL_TASK_ATTEMPTS="3")
    lock_s = 0
    if sweeper_died:
        # A worker killed (or a Redis restarted) in the middle of a redelivery sweep leaves the
        # sweep's lock behind; it must expire in seconds, not kombu's default five minutes.
        settings = load_settings(redis_url=slow.redis_url, visibility_timeout_s=3)
        lock_s = celery_config(settings)["broker_transport_options"]["unacked_mutex_expire"]
        assert lock_s <= 3
        slow_client.redis.lock(KOMBU_UNACKED_MUTEX, timeout=lock_s).acquire(blocking=False)
    pair = [
        start_worker(
            ["llava:7b"],
            redis_url=slow.redis_url,
            ollama_host=slow.sim.url,
            name=f"crash{i}@slow",
            log_path=tmp_path / f"c{i}.log",
            env=env,
        )
        for i in (1, 2)
    ]
    try:
        job = slow_client.generate("llava:7b", "survive", options={"num_predict": 300})
        start = wait_for_tokens(job, 10)
        victim = next(c for c in pair if c.node_name == start["worker"])  # type: ignore[attr-defined]
        killed_at = time.monotonic()
        victim.kill()
        result = job.result(timeout=WAIT_S)
        recovery_s = time.monotonic() - killed_at
        events = list(job.stream())
        kinds = [e["type"] for e in events]
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert kinds.count("done") == 1 and kinds[-1] == "done"
        assert kinds.count("restart") == 1 and kinds.index("restart") > kinds.index("token")
        assert result.worker != victim.node_name  # type: ignore[attr-defined]
        assert result.metrics.eval_count == 300
        assert recovery_s < 3 + lock_s + 2 + 6 + 5  # timeout + lock + sweep + generation + slack
    finally:
        for child in pair:
            child.stop()
    assert requests.get(slow.sim.url + "/api/version", timeout=5).ok


def test_deadline_covers_the_queue_wait(slow: SlowStack, slow_client: Client) -> None:
    blocker = slow_client.generate("llama3.2", "hold the only slot", options={"num_predict": 100})
    wait_for_tokens(blocker, 1)
    late = slow_client.generate("llama3.2", "too late", deadline_s=0.5)
    with pytest.raises(TaskTimeout, match="waited in the queue past its deadline"):
        late.result(timeout=WAIT_S)
    assert blocker.result(timeout=WAIT_S).metrics.eval_count == 100
    assert slow.sim.stats()["generations_started"] == 1  # the late one never reached Ollama
