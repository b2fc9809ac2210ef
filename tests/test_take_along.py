"""Embed tasks taken along: a running embed task serves the pending ones of its model in its
own calls and slot, and each of them still ends as a task of its own.

The module's worker has one slot, so that the tasks submitted while it is busy wait in the
scheduler (on its own database and simulator, apart from the other tests' workers).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producers import Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from producers.jobs import Job
from tasks.app import create_app
from tasks.errors import TaskCancelled
from tasks.keys import KOMBU_UNACKED, LEDGER_KEY, SCHED_TASKS_KEY, queue_name
from tasks.kinds.embed import EmbedResult
from tasks.settings import Settings, load_settings
from tests.conftest import FAST_RETRIES
from tests.embed_support import MODEL, EmbedSim, outcomes, slow_first_call, wait_running

BATCH = 8  # CORRAL_EMBED_BATCH_MAX_INPUTS of this module's workers
DB = 8
WAIT_S = 60
NODE = "rider@embed"
SHORT_REDELIVERY = {"CORRAL_VISIBILITY_TIMEOUT_S": "3", "CORRAL_LEASE_TTL_S": "1.5"}


@pytest.fixture(scope="module")
def url(redis_server: Any) -> Iterator[str]:
    url = f"redis://{redis_server.host}:{redis_server.port}/{DB}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture(scope="module")
def embed_sim() -> Iterator[EmbedSim]:
    child, sim_url = start_simulator([])
    yield EmbedSim(sim_url)
    child.stop()


def one_slot_worker(url: str, sim: EmbedSim, log: Path, name: str = NODE, **env: str) -> Child:
    settings = {**FAST_RETRIES, **env, "CORRAL_EMBED_BATCH_MAX_INPUTS": str(BATCH)}
    return start_worker(
        [MODEL], redis_url=url, ollama_host=sim.url, slots=1, name=name, log_path=log, env=settings
    )


@pytest.fixture(scope="module")
def worker(
    url: str, embed_sim: EmbedSim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    child = one_slot_worker(url, embed_sim, tmp_path_factory.mktemp("rider") / "worker.log")
    yield child
    child.stop()


@pytest.fixture
def sim(embed_sim: EmbedSim, worker: Child) -> Iterator[EmbedSim]:
    embed_sim.configure(models={MODEL: {"load_s": 0.0, "first_token_s": 0.0}})
    embed_sim.reset()
    yield embed_sim
    embed_sim.clear_faults()
    embed_sim.configure(models={MODEL: {"load_s": 0.0, "first_token_s": 0.0}})


@pytest.fixture
def settings(url: str) -> Settings:
    return load_settings(redis_url=url)


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


class CeleryEvents:
    """The Celery task events (what Flower reads), by task id, from a real receiver."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.seen: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection, handlers={"*": self._note})
            self._receiver.consumer_context_ready = self.ready
            for _ in self._receiver.consume(limit=None, timeout=None, wakeup=False):
                self.ready.set()

    def _note(self, event: dict[str, Any]) -> None:
        if "uuid" in event:
            self.seen[event["uuid"]].append(event)

    def __enter__(self) -> CeleryEvents:
        self._thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True

    def types(self, task_id: str, until: str, timeout_s: float = 10) -> list[str]:
        """The event types of a task, once ``until`` is among them (or the timeout passes)."""
        deadline = time.monotonic() + timeout_s
        while until not in (found := [e["type"] for e in self.seen[task_id]]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return found


def wait_started(job: Job) -> None:
    """Until the task's ``start`` event."""
    events = job.stream(timeout=WAIT_S)
    while next(events)["type"] != "start":
        pass
    events.close()


def busy_slot(client: Client, sim: EmbedSim, load_s: float, then_delay_s: float = 0.0) -> Job:
    """A task that holds the worker's one slot while its call loads the model for ``load_s``:
    what is submitted meanwhile waits in the scheduler. The calls made after it wait
    ``then_delay_s`` before they answer."""
    slow_first_call(sim, load_s=load_s)
    mark = sim.mark()
    holder = client.embed(MODEL, "hold the slot")
    sim.wait_for_event("load", since=mark, timeout_s=WAIT_S)  # its call is in
    if then_delay_s:
        sim.faults(first_byte_delay_seconds=then_delay_s)
    return holder


def drained(r: redis.Redis) -> bool:
    """Nothing left unacknowledged, in the ledger or in the scheduler."""
    return not (r.hlen(KOMBU_UNACKED) or r.hlen(LEDGER_KEY) or r.hlen(SCHED_TASKS_KEY))


def test_pending_tasks_go_into_the_running_tasks_calls(
    client: Client, sim: EmbedSim, settings: Settings
) -> None:
    """With one slot, each task released takes the pending ones that fit in its call along:
    [1, 8, 4] inputs in three calls, not thirteen calls. Each task keeps its own stream, result
    (with Celery's extended fields) and Flower events."""
    sizes = [1, 1, 1, 1, 1, 3, 1, 1, 1, 1]  # 1 + 4 + 3 fill a call of 8; the last four share one
    texts = [[f"text {i}.{j}" for j in range(n)] for i, n in enumerate(sizes)]
    with CeleryEvents(settings) as events:
        mark = sim.mark()
        holder = busy_slot(client, sim, load_s=3.0)
        jobs = [client.embed(MODEL, t) for t in texts]
        results = [job.result(timeout=WAIT_S) for job in [holder, *jobs]]
        assert [call["inputs"] for call in sim.embed_calls(mark)] == [1, 8, 4]
        for job, result, t in zip(jobs, results[1:], texts, strict=True):
            assert isinstance(result, EmbedResult)
            assert result.embeddings == sim.direct(t)["embeddings"]
            assert result.worker == NODE and result.task_id == job.id
            assert [e["type"] for e in job.stream(timeout=WAIT_S)] == ["start", "done"]
            meta = client.backend.get_task_meta(job.id)
            assert meta["status"] == "SUCCESS" and meta["result"]["embeddings"]
            assert meta["name"] == "corral.embed" and meta["queue"] == queue_name(MODEL)
            assert meta["worker"] == NODE
            kinds = events.types(job.id, until="task-succeeded")
            assert {"task-received", "task-started", "task-succeeded"} <= set(kinds), kinds
            assert {e["hostname"] for e in events.seen[job.id] if e["type"] != "task-sent"} == {
                NODE
            }
    r = client.redis
    deadline = time.monotonic() + WAIT_S
    while not drained(r):
        assert time.monotonic() < deadline, "unacknowledged messages or scheduler entries left"
        time.sleep(0.05)


def test_a_task_taken_along_is_cancelled_alone(client: Client, sim: EmbedSim) -> None:
    busy_slot(client, sim, load_s=2.0, then_delay_s=3.0)  # the shared call then takes 3 s
    lead, rider, other = (client.embed(MODEL, f"cancel case {i}") for i in range(3))
    wait_started(rider)  # taken along: its start is written when the lead takes it
    rider.cancel()
    with pytest.raises(TaskCancelled):
        rider.result(timeout=WAIT_S)
    assert [e["type"] for e in rider.stream(timeout=WAIT_S)] == ["start", "cancelled"]
    for job in (lead, other):
        result = job.result(timeout=WAIT_S)
        assert isinstance(result, EmbedResult) and len(result.embeddings) == 1
        assert [e["type"] for e in job.stream(timeout=WAIT_S)] == ["start", "done"]
    assert client.redis.hget(f"corral:task:{rider.id}", "state") == b"cancelled"


def test_tasks_taken_along_by_a_killed_worker_are_each_embedded_once_by_another(
    url: str, embed_sim: EmbedSim, worker: Child, tmp_path: Path
) -> None:
    """A worker dies while its one slot serves a task and those it took along: each of them
    comes back after the visibility timeout, and another worker ends it with one ``done``."""
    worker.stop()  # this test brings its own, with short redelivery times
    texts = [f"held {i}" for i in range(6)]
    embed_sim.configure(models={MODEL: {"load_s": 0.0, "first_token_s": 0.0}})
    victim = one_slot_worker(
        url, embed_sim, tmp_path / "victim.log", "victim@rider", **SHORT_REDELIVERY
    )
    rescuer = None
    try:
        with Client(settings=load_settings(redis_url=url)) as client:
            holder = busy_slot(client, embed_sim, load_s=2.0, then_delay_s=30.0)  # then hangs
            jobs = [client.embed(MODEL, text) for text in texts]
            wait_running(jobs, WAIT_S)
            assert holder.result(timeout=WAIT_S)
            victim.kill()
            embed_sim.clear_faults()
            rescuer = one_slot_worker(
                url, embed_sim, tmp_path / "rescuer.log", "rescuer@rider", **SHORT_REDELIVERY
            )
            results, streams = outcomes(jobs, WAIT_S)
    finally:
        victim.stop()
        if rescuer is not None:
            rescuer.stop()
        embed_sim.clear_faults()
    direct = embed_sim.direct(texts)["embeddings"]
    assert [r.embeddings[0] for r in results if isinstance(r, EmbedResult)] == direct
    assert all(r.worker == "rescuer@rider" for r in results)
    assert all(kinds == ["start", "start", "done"] for kinds in streams), streams
