"""The scheduler wired end to end: real Redis, real Celery workers, the simulator.

Corral, not list order, decides what runs next: a shared Ollama host keeps its loaded model,
urgent work overtakes a backlog, a tenant that arrives late is not behind another's flood.
Each test has its own simulator (its /_sim/stats counts the model loads) and Redis database.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producers import Client, Job
from producers.cli.local_stack import Child, start_simulator, start_worker
from tasks.keys import (
    KOMBU_UNACKED,
    SCHED_BACKLOGGED_KEY,
    lease_key,
    log_key,
    task_key,
    worker_key,
)
from tasks.registry import ANNOUNCE_TTL_S
from tasks.scheduler.served import note_offered
from tasks.settings import load_settings
from tests.conftest import SimControl
from tests.wire_support import announce_idle_worker, wait_until
from workers.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.slow
FAST_SIM = ["--tokens-per-second", "400", "--first-token-seconds", "0.01"]
WORKER_ENV = {"CORRAL_RETRY_BACKOFF_S": "0.05", "CORRAL_RETRY_BACKOFF_MAX_S": "0.2"}
MODELS = ("llama3.2", "llava:7b", "deepseek-r1:14b")
RESULT_S = 90


@dataclass
class Stack:
    """A simulator, a Redis database of its own, and the workers started on them."""

    redis_url: str
    sim: SimControl
    logs: Path
    workers: list[Child] = field(default_factory=list)

    def worker(self, models: list[str], slots: int = 1, **env: str) -> Child:
        name = f"{'+'.join(m.replace(':', '-') for m in models)}-{len(self.workers)}@sched"
        child = start_worker(
            models,
            redis_url=self.redis_url,
            ollama_host=self.sim.url,
            slots=slots,
            name=name,
            env={**WORKER_ENV, **env},
            log_path=self.logs / f"{name}.log",
        )
        self.workers.append(child)
        return child


@pytest.fixture
def stack(
    request: pytest.FixtureRequest, redis_server: EmbeddedRedis, tmp_path: Path
) -> Iterator[Stack]:
    """``@pytest.mark.parametrize("stack", [[sim args]], indirect=True)`` for its simulator."""
    args = getattr(request, "param", [])
    db = 14
    url = f"redis://{redis_server.host}:{redis_server.port}/{db}"
    with Client(settings=load_settings(redis_url=url)) as flush:
        flush.redis.flushdb()
    child, sim_url = start_simulator([*FAST_SIM, *args])
    built = Stack(url, SimControl(sim_url), tmp_path)
    try:
        yield built
    finally:
        for worker in built.workers:
            worker.stop()
        child.stop()
        with Client(settings=load_settings(redis_url=url)) as flush:
            flush.redis.flushdb()


def started_at(client: Client, job: Job) -> float:
    return float(client.redis.hget(task_key(job.id), "started_at") or 0)


def start_order(client: Client, jobs: list[Job]) -> list[Job]:
    """The jobs, all finished, in the order their runs started."""
    for job in jobs:
        job.result(timeout=RESULT_S)
    return sorted(jobs, key=lambda job: started_at(client, job))


def events(client: Client, job: Job) -> list[dict]:
    return [json.loads(f[b"e"]) for _, f in client.redis.xrange(log_key(job.id))]


# -- model affinity on a shared Ollama host -----------------------------------------------------
ONE_RESIDENT = ["--max-loaded-models", "1", "--load-seconds", "0.2"]


def round_robin(client: Client, count: int) -> list[Job]:
    return [
        client.generate(MODELS[i % 3], f"round {i}", options={"num_predict": 4})
        for i in range(count)
    ]


@pytest.mark.parametrize("stack", [ONE_RESIDENT], indirect=True)
def test_one_worker_serving_three_models_keeps_the_loaded_one(stack: Stack) -> None:
    stack.worker(list(MODELS))
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        jobs = round_robin(client, 30)
        order = start_order(client, jobs)
    loads = stack.sim.stats()["loads"]
    assert loads <= 6, (loads, [job.record()["model"] for job in order])


@pytest.mark.parametrize("stack", [ONE_RESIDENT], indirect=True)
def test_three_workers_one_per_model_on_one_host_keep_the_loaded_one(stack: Stack) -> None:
    for model in MODELS:
        stack.worker([model])
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        jobs = round_robin(client, 30)
        order = start_order(client, jobs)
    loads = stack.sim.stats()["loads"]
    assert loads <= 6, (loads, [job.record()["model"] for job in order])


# -- priorities and tenants -----------------------------------------------------------------------
SLOW_ENOUGH = {"options": {"num_predict": 12}}  # about 40 ms a task: the backlog outlives submits


def test_a_priority_9_task_overtakes_a_backlog_of_40(stack: Stack) -> None:
    stack.worker(["llama3.2"])
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        backlog = [
            client.generate("llama3.2", f"batch {i}", priority=0, **SLOW_ENOUGH) for i in range(40)
        ]
        urgent = client.generate("llama3.2", "now, please", priority=9, **SLOW_ENOUGH)
        order = start_order(client, [*backlog, urgent])
        submitted = float(client.redis.hget(task_key(urgent.id), "submitted_at") or 0)
    before = [job for job in order[: order.index(urgent)]]
    overtaken_after_submit = [job for job in before if started_at(client, job) > submitted]
    # One slot: at most the task running and the one released for it go first.
    assert len(overtaken_after_submit) <= 2, len(overtaken_after_submit)
    assert order.index(urgent) < 40


def test_an_urgent_task_released_after_others_is_taken_first(stack: Stack) -> None:
    """Released tasks wait in Celery's queue until a worker has a free thread (a little after
    the scheduler counted the slot free: the task that ended still stores its result). An
    urgent task released after them is the first a worker takes."""
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        announce_idle_worker(client.redis, "llama3.2", slots=3)  # no process: they wait
        backlog = [client.generate("llama3.2", f"batch {i}", priority=0) for i in range(2)]
        urgent = client.generate("llama3.2", "now, please", priority=9)
        assert client.scheduler.backlog("llama3.2").released == 3
        assert client.scheduler.position(urgent.id) == 0
        stack.worker(["llama3.2"])  # one slot: takes them one at a time, in the queue's order
        order = start_order(client, [*backlog, urgent])
    assert [job.id for job in order] == [urgent.id, *(job.id for job in backlog)]


def test_a_tenant_arriving_after_a_flood_shares_the_slot(stack: Stack) -> None:
    stack.worker(["llama3.2"])
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        flood = [
            client.generate("llama3.2", f"a {i}", tenant="a", **SLOW_ENOUGH) for i in range(40)
        ]
        late = [client.generate("llama3.2", f"b {i}", tenant="b", **SLOW_ENOUGH) for i in range(5)]
        order = start_order(client, [*flood, *late])
        first_b = float(client.redis.hget(task_key(late[0].id), "submitted_at") or 0)
    after = [job for job in order if started_at(client, job) > first_b]
    places = [after.index(job) for job in late]
    # Turns: b, a, b, a... (plus the one task released before b arrived), not forty of a first.
    assert max(places) <= 11, places
    assert sum(job in flood for job in after[: max(places) + 1]) <= 7


# -- still exactly once ---------------------------------------------------------------------------
RECOVERY_ENV = {"CORRAL_VISIBILITY_TIMEOUT_S": "3", "CORRAL_LEASE_TTL_S": "1.5"}


def test_a_worker_killed_between_release_and_start_loses_nothing(stack: Stack) -> None:
    """The worker takes the released message (kombu records it as unacknowledged) and dies
    before the task starts: a lease the test holds keeps it waiting right there. The message
    comes back, runs once, and the work pending behind it follows in its order."""
    victim = stack.worker(["llama3.2"], **RECOVERY_ENV)
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        first_id = "released-then-orphaned"
        client.redis.set(lease_key(first_id), "held by the test", px=60_000)
        first = client.submit(
            "generate", {"model": "llama3.2", "prompt": "first"}, task_id=first_id
        )
        behind = [client.generate("llama3.2", f"behind {i}") for i in range(4)]
        wait_until(
            lambda: any(first_id.encode() in m for m in client.redis.hvals(KOMBU_UNACKED)),
            what="the worker to take the released message",
        )
        positions = {job.id: client.scheduler.position(job.id) for job in [first, *behind]}
        assert list(positions.values()) == [0, 1, 2, 3, 4]  # released, then pending in order
        assert client.scheduler.backlog("llama3.2").running == 0  # it never started
        victim.kill()
        client.redis.delete(lease_key(first_id))
        # Until its announcement lapses, the dead worker's slot still counts: a task released
        # into it could start before the recovered one. Recovery ends when it lapses.
        announcement = worker_key(victim.node_name)  # type: ignore[attr-defined]
        wait_until(
            lambda: not client.redis.exists(announcement),
            timeout_s=ANNOUNCE_TTL_S + 5,
            what="the dead worker's announcement to lapse",
        )
        assert [client.scheduler.position(job.id) for job in [first, *behind]] == [0, 1, 2, 3, 4]
        stack.worker(["llama3.2"], **RECOVERY_ENV)
        order = start_order(client, [first, *behind])
        assert [job.id for job in order] == list(positions)  # the order they were told
        for job in order:  # run once each: one start, one terminal event
            kinds = [e["type"] for e in events(client, job)]
            assert kinds.count("start") == 1 and kinds[-1] == "done", kinds
        assert stack.sim.stats()["generations_started"] == 5
        backlog = client.scheduler.backlog("llama3.2")
        assert (backlog.pending, backlog.released, backlog.running) == (0, 0, 0)


def test_a_worker_finds_work_admitted_without_the_release_indexes(stack: Stack) -> None:
    """Work pending from before the release's indexes existed (an older producer admitted it,
    or the index was lost) is found: a worker rebuilds them on its release timer's first round
    and runs the task, though no admission names the model again."""
    with Client(settings=load_settings(redis_url=stack.redis_url)) as client:
        note_offered(client.redis, {"models": [{"name": "llama3.2"}]})  # served, no worker yet
        job = client.generate("llama3.2", "from before the indexes", options={"num_predict": 4})
        assert client.scheduler.position(job.id) == 0
        client.redis.delete(SCHED_BACKLOGGED_KEY)
        stack.worker(["llama3.2"])
        assert job.result(timeout=RESULT_S).text
        assert client.redis.sismember(SCHED_BACKLOGGED_KEY, "llama3.2:latest") == 0


def test_pending_work_survives_a_redis_restart(tmp_path: Path) -> None:
    """Redis is SIGKILLed while one task runs and the rest wait in the scheduler: after the
    restart every task runs and ends once, in the order the positions then say."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    sim, sim_url = start_simulator(["--tokens-per-second", "200", "--first-token-seconds", "0"])
    worker = start_worker(
        ["llama3.2"],
        redis_url=server.url,
        ollama_host=sim_url,
        log_path=tmp_path / "worker.log",
        env={**WORKER_ENV, **RECOVERY_ENV},
    )
    client = Client(settings=load_settings(redis_url=server.url))
    try:
        jobs = [
            client.generate(
                "llama3.2",
                f"task {i}",
                priority=i % 3 * 4,
                tenant="ab"[i % 2],
                options={"num_predict": 30},
            )
            for i in range(10)
        ]
        for event in jobs[0].stream(timeout=30):
            if event["type"] == "token":
                break  # the first task runs; the others wait in the scheduler
        server.kill()
        server.start()
        positions = {job.id: client.scheduler.position(job.id) for job in jobs}
        waiting = sorted((p, job_id) for job_id, p in positions.items() if p is not None)
        assert len(waiting) >= 7
        order = [job.id for job in start_order(client, jobs)]
        assert [job_id for _, job_id in waiting] == [j for j in order if positions[j] is not None]
        for job in jobs:
            kinds = [e["type"] for e in events(client, job)]
            assert sum(k in ("done", "error", "cancelled") for k in kinds) == 1, kinds
            if positions[job.id] is not None:  # waited through the restart: ran once
                assert kinds.count("start") == 1 and kinds[-1] == "done", kinds
    finally:
        client.close()
        worker.stop()
        sim.stop()
        server.stop()
