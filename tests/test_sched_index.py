"""The indexes a release reads: the models with pending work, and per host the models with
tasks released for it or running on it. A release visits those instead of every model the host
serves, so each step that changes pending, released or running work must keep them true.

The clock is passed to every call (``now``), as in tests/test_scheduler.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tasks.keys import SCHED_BACKLOGGED_KEY, sched_host_active_key
from tasks.scheduler import Scheduler, Served
from tasks.settings import load_settings
from tests.conftest import flushed_db
from tests.test_scheduler import admit, message, scheduler
from workers.embedded_redis import EmbeddedRedis

DB = 10
HOST = "http://gpu-index:11434"
M_A, M_B, M_C = "idx-a:latest", "idx-b:latest", "idx-c:latest"


@pytest.fixture
def raw(redis_server) -> Iterator[redis.Redis]:
    yield from flushed_db(redis_server, DB)


@pytest.fixture
def sched(raw: redis.Redis) -> Scheduler:
    return scheduler(raw)


def backlogged(raw: redis.Redis) -> set[str]:
    return {m.decode() for m in raw.smembers(SCHED_BACKLOGGED_KEY)}


def active(raw: redis.Redis, host: str = HOST) -> set[str]:
    return {m.decode() for m in raw.smembers(sched_host_active_key(host))}


def test_the_indexes_follow_a_task_from_admission_to_its_end(
    sched: Scheduler, raw: redis.Redis
) -> None:
    admit(sched, "a0", at=0, model=M_A)
    admit(sched, "a1", at=1, model=M_A)
    assert (backlogged(raw), active(raw)) == ({M_A}, set())
    assert sched.release_for_host(HOST, [M_A], 1, now=2).task_ids == ["a0"]
    assert (backlogged(raw), active(raw)) == ({M_A}, {M_A})  # a1 still pending, a0 released
    assert sched.started("a0", host=HOST, now=3)
    assert active(raw) == {M_A}
    sched.finished("a0", M_A, now=4)
    assert active(raw) == set()
    assert sched.release_for_host(HOST, [M_A], 1, now=5).task_ids == ["a1"]
    assert (backlogged(raw), active(raw)) == (set(), {M_A})
    sched.finished("a1", M_A, now=6)  # ended without a start (cancelled while queued, say)
    assert (backlogged(raw), active(raw)) == (set(), set())


def test_cancel_and_purge_take_the_model_out_when_its_last_pending_task_goes(
    sched: Scheduler, raw: redis.Redis
) -> None:
    admit(sched, "a0", at=0, model=M_A)
    admit(sched, "b0", at=0, model=M_B)
    admit(sched, "b1", at=1, model=M_B)
    assert sched.cancel("a0") == "pending"
    assert backlogged(raw) == {M_B}
    assert sched.cancel("b0") == "pending"
    assert backlogged(raw) == {M_B}  # b1 still waits
    sched.purge(M_B)
    assert backlogged(raw) == set()
    assert sched.release_for_host(HOST, [M_A, M_B], 2, now=2).task_ids == []
    assert sched.host_state(HOST).switches == 0


def test_a_start_on_another_host_moves_the_task_between_their_indexes(
    sched: Scheduler, raw: redis.Redis
) -> None:
    other = "http://gpu-other:11434"
    admit(sched, "a0", at=0, model=M_A)
    assert sched.release_for_host(HOST, [M_A], 1, now=1).task_ids == ["a0"]
    assert sched.started("a0", host=other, now=2)  # taken from the shared queue by other
    assert (active(raw), active(raw, other)) == (set(), {M_A})
    sched.finished("a0", M_A, now=3)
    assert active(raw, other) == set()


def test_stale_entries_are_pruned_and_leave_the_index(raw: redis.Redis) -> None:
    """A task released for the host whose worker never reported holds its slot until the
    deadline; then the next release drops it, and the slot and the index are free again."""
    sched = scheduler(raw, task_deadline_s=100)
    admit(sched, "a0", at=0, model=M_A)
    admit(sched, "a1", at=0.5, model=M_A)
    assert sched.release_for_host(HOST, [M_A], 1, now=1).task_ids == ["a0"]
    assert sched.release_for_host(HOST, [M_A], 1, now=50).task_ids == []  # a0 holds the slot
    assert sched.release_for_host(HOST, [M_A], 1, now=102).task_ids == ["a1"]  # a0 pruned
    assert active(raw) == {M_A} and raw.zcard(f"corral:sched:busy:{HOST}:{M_A}") == 1
    assert sched.release_for_host(HOST, [M_A], 1, now=203).task_ids == []  # a1 pruned too
    assert (backlogged(raw), active(raw)) == (set(), set())


def test_a_model_no_longer_served_keeps_its_entry_until_its_tasks_end(
    sched: Scheduler, raw: redis.Redis
) -> None:
    """As before the indexes: the host's tasks of a model it no longer serves do not count
    against its slots, and the model leaves what the host keeps loaded."""
    sched.note_loaded(HOST, [], resident=2, now=0)
    admit(sched, "a0", at=0, model=M_A)
    admit(sched, "b0", at=0, model=M_B)
    step = sched.release_for_host(HOST, [M_A, M_B], 2, now=1)
    assert sorted(step.task_ids) == ["a0", "b0"] and active(raw) == {M_A, M_B}
    assert sched.started("b0", host=HOST, now=2)
    admit(sched, "a1", at=2, model=M_A)
    # The worker for M_B stopped: only M_A is served. a0 still holds one of the two slots.
    assert sched.release_for_host(HOST, [M_A], 2, now=3).task_ids == ["a1"]
    assert sched.host_state(HOST).loaded == [M_A]
    assert active(raw) == {M_A, M_B}  # b0 still runs here
    sched.finished("b0", M_B, now=4)
    assert active(raw) == {M_A}


def test_an_index_entry_without_work_behind_it_is_dropped_not_followed(
    sched: Scheduler, raw: redis.Redis
) -> None:
    """An index is a hint: a release reads the model's own structures, and fixes the index."""
    admit(sched, "a0", at=0, model=M_A)
    raw.sadd(SCHED_BACKLOGGED_KEY, M_C)
    raw.sadd(sched_host_active_key(HOST), M_B)
    step = sched.release_for_host(HOST, [M_A, M_B, M_C], 2, now=1)
    assert (step.model, step.switches, step.task_ids) == (M_A, 1, ["a0"])
    assert (backlogged(raw), active(raw)) == (set(), {M_A})


def test_reindex_finds_work_admitted_without_the_indexes(
    sched: Scheduler, raw: redis.Redis
) -> None:
    admit(sched, "a0", at=0, model=M_A)
    admit(sched, "b0", at=0, model=M_B)
    assert sched.release_for_host(HOST, [M_B], 1, now=1).task_ids == ["b0"]
    raw.delete(SCHED_BACKLOGGED_KEY, sched_host_active_key(HOST))  # as an older producer left it
    assert sched.release_for_host(HOST, [M_A], 1, now=2).task_ids == []  # not found
    assert sched.reindex(HOST) == 2  # M_A pending, M_B released here
    assert (backlogged(raw), active(raw)) == ({M_A}, {M_B})
    assert sched.reindex(HOST) == 0
    sched.finished("b0", M_B, now=3)
    assert sched.release_for_host(HOST, [M_A], 1, now=3).task_ids == ["a0"]


def test_served_models_built_once_release_the_same() -> None:
    assert Served.of({"IDX-B": 2, M_A: 3}, 1) == Served(f"{M_A} 3 {M_B} 2")
    assert Served.of(["idx-a"], 4) == Served(f"{M_A} 4")


def test_a_release_costs_the_same_for_one_served_model_and_fifty() -> None:
    """Redis commands of one release, counted by Redis itself, with other models' backlogs
    beside it: the served models without work are not visited."""
    calls: dict[int, int] = {}
    for served in (1, 50):
        with EmbeddedRedis() as server:
            client = redis.Redis.from_url(server.url)
            sched = Scheduler(client, load_settings(redis_url=server.url))
            models = [f"served{i}:latest" for i in range(served)]
            for i in range(10):  # pending on models nobody here serves
                for k in range(3):
                    waiting = f"waiting{i}:latest"
                    sched.admit(message(f"w{i}-{k}", waiting), model=waiting, submitted_at=k)
            for k in range(2):
                sched.admit(message(f"s{k}", models[0]), model=models[0], submitted_at=k, now=k)
            capacity = Served.of(dict.fromkeys(models, 4), 4)
            assert sched.release_for_host(HOST, capacity, 1, now=3).task_ids == ["s0"]
            assert sched.started("s0", host=HOST, now=3)
            sched.finished("s0", models[0], now=4)
            client.config_resetstat()
            assert sched.release_for_host(HOST, capacity, 1, now=5).task_ids == ["s1"]
            stats = client.info("commandstats")
            calls[served] = sum(v["calls"] for k, v in stats.items() if k != "cmdstat_config")
            client.close()
    assert calls[1] == calls[50], calls
