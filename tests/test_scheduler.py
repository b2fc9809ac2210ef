"""The scheduler's core on a real Redis: admission, order, fairness, affinity, position, ETA.

The clock is passed to every call (``now``), so aging and waits need no sleeping. One test runs
a released message on a real Celery worker; the rest inspect Redis directly.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from celery.utils.saferepr import saferepr

from producers import Client
from tasks.app import create_app
from tasks.broker import sweep_ledger
from tasks.errors import InvalidRequest, QueueFull
from tasks.keys import (
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    LEDGER_INDEX_KEY,
    LEDGER_KEY,
    MODELS_KEY,
    queue_name,
    task_key,
    task_name,
)
from tasks.payloads import dump_payload, validate_payload
from tasks.queues import purge_model
from tasks.scheduler import (
    UNITS_HEADER,
    Admission,
    MessageBuilder,
    ReadyMessage,
    Scheduler,
    estimate_start_s,
)
from tasks.scheduler.messages import short_repr
from tasks.settings import load_settings
from tests.conftest import flushed_db
from tests.wire_support import announce_idle_worker, wait_until
from workers.embedded_redis import EmbeddedRedis

DB = 6
MODEL = "sched-model:latest"
AGING_S = 60.0


@pytest.fixture
def raw(redis_server) -> Iterator[redis.Redis]:
    yield from flushed_db(redis_server, DB)


def scheduler(client: redis.Redis, **settings: object) -> Scheduler:
    url = "redis://{host}:{port}/{db}".format(**client.connection_pool.connection_kwargs)
    return Scheduler(client, load_settings(redis_url=url, **settings))


@pytest.fixture
def sched(raw: redis.Redis) -> Scheduler:
    return scheduler(raw, priority_aging_s=AGING_S)


def message(task_id: str, model: str = MODEL) -> ReadyMessage:
    """A stand-in message for tests that never run it (built ones: see the ledger tests)."""
    body = json.dumps({"id": task_id, "properties": {"delivery_tag": f"tag-{task_id}"}})
    return ReadyMessage(task_id, queue_name(model), queue_name(model), body, f"tag-{task_id}")


def admit(
    sched: Scheduler,
    task_id: str,
    at: float,
    *,
    model: str = MODEL,
    tenant: str = "a",
    priority: int = 5,
) -> Admission:
    admission = sched.admit(
        message(task_id, model),
        model=model,
        submitted_at=at,
        tenant=tenant,
        priority=priority,
        now=at,
    )
    assert admission.admitted
    return admission


def release_all(sched: Scheduler, now: float, model: str = MODEL) -> list[str]:
    return sched.release(model, 10**6, now=now)


# -- priorities and aging ---------------------------------------------------------------------
def test_higher_priority_starts_sooner(sched: Scheduler) -> None:
    for i in range(40):
        admit(sched, f"batch-{i}", at=i, priority=0)
    urgent = admit(sched, "urgent", at=40, priority=9)
    assert urgent.position == 0  # the next start, ahead of forty earlier tasks
    assert sched.release(MODEL, 1, now=41) == ["urgent"]
    for task, priority in (("p3", 3), ("p7", 7), ("p5", 5)):
        admit(sched, task, at=42, priority=priority)
    assert release_all(sched, now=43)[:4] == ["p7", "p5", "p3", "batch-0"]


def test_a_task_gains_one_step_per_aging_period(sched: Scheduler) -> None:
    admit(sched, "old-0", at=0, priority=0)
    admit(sched, "new-9", at=100, priority=9)  # 0 waited 100 s: 1 step, 9 is still far ahead
    assert sched.position("new-9", now=100) == 0
    admit(sched, "late-9", at=9 * AGING_S + 1, priority=9)  # old-0 has now waited 9 steps
    now = 9 * AGING_S + 1
    assert [sched.position(t, now=now) for t in ("new-9", "old-0", "late-9")] == [0, 1, 2]
    assert release_all(sched, now=now) == ["new-9", "old-0", "late-9"]


def test_aged_work_of_another_tenant_meets_fresh_urgent_work(sched: Scheduler) -> None:
    admit(sched, "a-old", at=0, tenant="a", priority=0)
    admit(sched, "a-older-2", at=1, tenant="a", priority=0)
    admit(sched, "b-urgent", at=590, tenant="b", priority=9)
    admit(sched, "b-urgent-2", at=590, tenant="b", priority=9)
    # Both tenants' heads are in the top band now; the tenants take turns.
    assert release_all(sched, now=600) == ["a-old", "b-urgent", "a-older-2", "b-urgent-2"]


# -- fairness between tenants -----------------------------------------------------------------
def test_a_tenant_arriving_after_a_flood_is_not_behind_it(sched: Scheduler) -> None:
    for i in range(40):
        admit(sched, f"a-{i}", at=i * 0.01, tenant="a")
    for task in sched.release(MODEL, 10, now=1):
        sched.started(task, now=1)
    positions = [admit(sched, f"b-{i}", at=2 + i * 0.01, tenant="b").position for i in range(5)]
    assert positions == [0, 2, 4, 6, 8]
    alternating = [task for i in range(5) for task in (f"b-{i}", f"a-{10 + i}")]
    assert sched.release(MODEL, 10, now=3) == alternating


def test_equal_weights_alternate(sched: Scheduler) -> None:
    for tenant in ("a", "b"):
        for i in range(10):
            admit(sched, f"{tenant}-{i}", at=i * 0.01 + (0 if tenant == "a" else 1), tenant=tenant)
    tenants = [t[0] for t in release_all(sched, now=5)]
    assert "".join(tenants) == "ab" * 10


def test_weights_share_the_slots_in_proportion(sched: Scheduler) -> None:
    sched.set_tenant_weight("heavy", 3)
    for i in range(40):
        admit(sched, f"light-{i}", at=i * 0.01, tenant="light")
        admit(sched, f"heavy-{i}", at=i * 0.01, tenant="heavy")
    first = Counter(t.split("-")[0] for t in sched.release(MODEL, 20, now=5))
    assert first == {"heavy": 15, "light": 5}


def test_an_idle_tenant_banks_no_credit(sched: Scheduler) -> None:
    for i in range(30):
        admit(sched, f"a-{i}", at=i * 0.01, tenant="a")
    release_all(sched, now=1)  # a ran alone while b was idle
    for i in range(20):
        admit(sched, f"a-{30 + i}", at=2 + i * 0.01, tenant="a")
        admit(sched, f"b-{i}", at=2 + i * 0.01, tenant="b")
    share = Counter(t[0] for t in sched.release(MODEL, 10, now=3))
    assert share == {"a": 5, "b": 5}  # not ten of b's in a row to "catch up"


# -- admission and its bound ------------------------------------------------------------------
def test_the_depth_bound_holds_under_parallel_admitters(sched: Scheduler) -> None:
    sched.set_depth_bound(MODEL, 50)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def admitter(worker: int) -> None:
        for i in range(25):
            task_id = f"w{worker}-{i}"
            got = sched.admit(message(task_id), model=MODEL, submitted_at=i, now=i).admitted
            with lock:
                outcomes.append(got)

    threads = [threading.Thread(target=admitter, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert Counter(outcomes) == {True: 50, False: 150}
    assert sched.backlog(MODEL).pending == 50


def test_a_refusal_is_a_retryable_queue_full_with_a_hint(raw: redis.Redis) -> None:
    sched = scheduler(raw, max_queue_depth=3)
    sched.finished("earlier", MODEL, run_s=8.0)  # the model's mean run time: 8 s
    for i in range(3):
        admit(sched, f"t{i}", at=i)
    refused = sched.admit(message("t3"), model=MODEL, submitted_at=3, slots=2, now=3)
    assert not refused.admitted and refused.depth == 3 and refused.bound == 3
    assert refused.retry_after_s == 4.0  # one of two slots frees every 8 / 2 s
    with pytest.raises(QueueFull) as caught:
        refused.raise_if_refused()
    assert caught.value.retryable and caught.value.retry_after_s == 4.0
    assert caught.value.model == MODEL and "retry in about 4 s" in str(caught.value)
    assert sched.position("t3") is None and raw.llen(queue_name(MODEL)) == 0
    # Released but not started still counts; started does not.
    assert sched.release(MODEL, 2, now=4) == ["t0", "t1"]
    assert not sched.admit(message("t3"), model=MODEL, submitted_at=3, now=4).admitted
    assert sched.started("t0", now=5)
    assert sched.admit(message("t3"), model=MODEL, submitted_at=3, now=5).admitted
    sched.set_depth_bound(MODEL, 10)  # a per-model bound overrides the setting
    assert admit(sched, "t4", at=6).bound == 10
    sched.set_depth_bound(MODEL, None)
    assert sched.admit(message("t5"), model=MODEL, submitted_at=7, now=7).bound == 3


def test_admitting_the_same_task_twice_changes_nothing(sched: Scheduler) -> None:
    first = admit(sched, "once", at=0)
    admit(sched, "other", at=1)
    again = sched.admit(message("once"), model=MODEL, submitted_at=5, priority=9, now=5)
    assert again.known and again.admitted and again.position == first.position == 0
    assert release_all(sched, now=6) == ["once", "other"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": "5"}, "priority"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "two words"}, "tenant"),
        ({"tenant": "x" * 129}, "tenant"),
        ({"model": "Not A Model!"}, "model"),
        ({"model": "another-model"}, "model"),  # the message was built for MODEL's queue
        ({"submitted_at": float("nan")}, "submitted_at"),
        ({"submitted_at": "yesterday"}, "submitted_at"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(
    sched: Scheduler, raw: redis.Redis, options: dict, field: str
) -> None:
    kwargs = {"model": MODEL, "submitted_at": 0.0, **options}
    with pytest.raises(InvalidRequest) as caught:
        sched.admit(message("bad"), **kwargs)
    assert caught.value.field == field
    assert raw.dbsize() == 0


def test_bad_weights_and_bounds_are_refused(sched: Scheduler) -> None:
    for weight in (0, -1, 1001, "2"):
        with pytest.raises(InvalidRequest) as caught:
            sched.set_tenant_weight("a", weight)  # type: ignore[arg-type]
        assert caught.value.field == "weight"
    with pytest.raises(InvalidRequest) as bound:
        sched.set_depth_bound(MODEL, 0)
    assert bound.value.field == "bound"


# -- release onto the Celery queue, covered by the ledger ----------------------------------------
def test_release_pushes_what_send_task_would_push(raw: redis.Redis) -> None:
    url = "redis://{host}:{port}/{db}".format(**raw.connection_pool.connection_kwargs)
    settings = load_settings(redis_url=url)
    app = create_app(settings)
    kwargs = {"payload": {"model": MODEL, "prompt": "hello"}, "submitted_at": 1.0}
    app.send_task(task_name("generate"), kwargs=kwargs, task_id="t1", queue=queue_name(MODEL))
    sent = json.loads(raw.rpop(queue_name(MODEL)))
    raw.delete(LEDGER_KEY, LEDGER_INDEX_KEY)
    with MessageBuilder(app) as builder:
        again = builder.build(  # the queue declared, the producer made: the same message
            task_name("generate"), kwargs=kwargs, task_id="t1", queue=queue_name(MODEL)
        )
        ready = builder.build(
            task_name("generate"), kwargs=kwargs, task_id="t1", queue=queue_name(MODEL)
        )
    built = json.loads(ready.raw)
    assert sent["properties"].pop("delivery_tag") != built["properties"].pop("delivery_tag")
    assert built == sent  # the same message, down to the body encoding
    assert json.loads(again.raw)["properties"].pop("delivery_tag") != ready.delivery_tag
    assert {**json.loads(again.raw), "properties": built["properties"]} == sent
    assert ready.sent_events == 1  # Celery's task-sent event was held back, not published
    assert raw.llen(queue_name(MODEL)) == 0 and not raw.hlen(LEDGER_KEY)  # nothing pushed yet

    sched = Scheduler(raw, settings)
    sched.admit(ready, model=MODEL, submitted_at=1.0, now=1.0)
    assert sched.release(MODEL, 1, now=2.0) == ["t1"]
    assert raw.lrange(queue_name(MODEL), 0, -1) == [ready.raw.encode()]
    assert raw.hget(LEDGER_KEY, ready.delivery_tag) == ready.ledger_entry.encode()
    assert raw.zscore(LEDGER_INDEX_KEY, ready.delivery_tag) is not None
    # A worker that pops the released message and dies before recording it: the ledger brings
    # it back, as for any other push.
    popped = raw.rpop(queue_name(MODEL))
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([ready.delivery_tag], [])
    assert raw.lrange(queue_name(MODEL), 0, -1) == [popped]
    app.close()


def test_take_along_takes_pending_tasks_in_order_as_kombu_records_a_delivery(
    raw: redis.Redis,
) -> None:
    """The pending tasks of one task name that fit leave the scheduler in its order, charged to
    their tenants, each message recorded as delivered and unacknowledged as kombu records it;
    the order stops at a task of another name or one that does not fit."""
    url = "redis://{host}:{port}/{db}".format(**raw.connection_pool.connection_kwargs)
    settings = load_settings(redis_url=url, priority_aging_s=AGING_S)
    app = create_app(settings)
    sched = Scheduler(raw, settings)
    plan = [("e1", "embed", 1), ("e2", "embed", 2), ("e3", "embed", 3), ("g1", "generate", 0)]
    plan += [("e4", "embed", 1)]
    ready = {}
    with MessageBuilder(app) as builder:
        for at, (task_id, kind, units) in enumerate(plan, start=1):
            headers = {UNITS_HEADER: units} if units else {}
            kwargs = {"payload": {"model": MODEL, "input": "x"}, "submitted_at": float(at)}
            ready[task_id] = builder.build(
                task_name(kind),
                kwargs=kwargs,
                task_id=task_id,
                queue=queue_name(MODEL),
                headers=headers,
            )
            sched.admit(ready[task_id], model=MODEL, submitted_at=at, tenant="t", now=at)
    assert sched.take_along(MODEL, task_name("embed"), 4, now=10.0) == [
        ready["e1"].ledger_entry,  # 1 unit
        ready["e2"].ledger_entry,  # 2 more: 3; e3 (3 units) does not fit in the 1 left
    ]
    for task_id in ("e1", "e2"):
        tag = ready[task_id].delivery_tag
        message = json.loads(ready[task_id].raw)
        info = message["properties"]["delivery_info"]
        entry = json.loads(raw.hget(KOMBU_UNACKED, tag))
        assert entry == [message, info["exchange"], info["routing_key"]]
        assert raw.zscore(KOMBU_UNACKED_INDEX, tag) == 10.0
        assert sched.position(task_id, now=10.0) is None  # left the scheduler
    assert sched.position("e3", now=10.0) == 0 and raw.llen(queue_name(MODEL)) == 0
    assert sched.take_along(MODEL, task_name("embed"), 10, now=11.0) == [ready["e3"].ledger_entry]
    assert sched.take_along(MODEL, task_name("embed"), 10, now=12.0) == []  # g1 is next
    assert release_all(sched, now=13.0) == ["g1", "e4"]
    app.close()


def test_a_purge_frees_the_slots_of_the_released_tasks_it_ends(raw: redis.Redis) -> None:
    """Released tasks still in Celery's queue hold their host's slots until they start; a purge
    that ends them gives the slots back at once, not at their deadline."""
    url = "redis://{host}:{port}/{db}".format(**raw.connection_pool.connection_kwargs)
    settings = load_settings(redis_url=url)
    announce_idle_worker(raw, MODEL, slots=2)  # its tasks are released, and stay in the queue
    with Client(settings=settings) as client:
        jobs = [client.generate(MODEL, "hello") for _ in range(4)]
        before = client.scheduler.backlog(MODEL)
        assert (before.pending, before.released) == (2, 2)
        purged = purge_model(raw, client.backend, MODEL, settings)
        assert sorted(purged.ended) == sorted(job.id for job in jobs)
        after = client.scheduler.backlog(MODEL)
        assert (after.pending, after.released) == (0, 0)
        client.generate(MODEL, "again")
        client.generate(MODEL, "and again")
        assert raw.llen(queue_name(MODEL)) == 2  # both free slots take the new work at once


@pytest.mark.usefixtures("worker")
def test_a_released_task_runs_on_a_real_worker(client: Client, sim) -> None:
    """The message admitted is built as the SDK builds it (Client._enqueue: the same record,
    the same send_task arguments); the worker runs it once it is released."""
    model, task_id, now = "llama3.2:latest", "sched-e2e-1", time.time()
    sched = Scheduler(client.redis, client.settings)
    payload = validate_payload(
        "generate",
        {"model": model, "prompt": "Why is the sky blue?", "options": {"num_predict": 5}},
        client.settings,
    )
    kwargs = {"payload": dump_payload(payload), "submitted_at": now, "deadline_s": None}
    record = {
        "kind": "generate",
        "model": model,
        "queue": queue_name(model),
        "submitted_at": now,
        "state": "queued",
    }
    client.redis.hset(task_key(task_id), mapping=record)
    client.redis.sadd(MODELS_KEY, model)
    with MessageBuilder(client.app) as builder:
        ready = builder.build(
            task_name("generate"), kwargs=kwargs, task_id=task_id, queue=queue_name(model)
        )
    assert sched.admit(ready, model=model, submitted_at=now, now=now).position == 0
    # Released by the worker's timer, unless this release comes first.
    assert sched.release(model, 1) in ([task_id], [])
    result = client.job(task_id).result(timeout=60)
    assert result.model == model and result.metrics.eval_count == 5
    assert sched.position(task_id) is None
    wait_until(lambda: sched.backlog(model).running == 0, what="the worker's finished()")


# -- model affinity on a shared Ollama host -----------------------------------------------------
def run_one(sched: Scheduler, host: str, task_id: str, now: float) -> None:
    """A worker of ``host`` starts the task and finishes it half a second later."""
    assert sched.started(task_id, host=host, now=now)
    sched.finished(task_id, MODEL, now=now + 0.5)


def test_a_host_keeps_its_model_while_it_has_work(sched: Scheduler) -> None:
    host, models = "http://gpu-a:11434", ["m-a:latest", "m-b:latest", "m-c:latest"]
    for i in range(30):  # round robin over three models, all within three seconds
        admit(sched, f"{i}", at=i * 0.1, model=models[i % 3])
    served = []
    for k in range(30):  # one slot; each task takes half a second
        step = sched.release_for_host(host, models, 1, now=3 + k * 0.5)
        assert len(step.task_ids) == 1
        served.append(sched.host_state(host).loaded)
        run_one(sched, host, step.task_ids[0], now=3 + k * 0.5)
    assert served == [[models[0]]] * 10 + [[models[1]]] * 10 + [[models[2]]] * 10
    assert sched.host_state(host).switches == 3  # three loads, not thirty
    assert sched.release_for_host(host, models, 1, now=20).task_ids == []


def test_a_host_does_not_switch_while_its_model_still_runs(sched: Scheduler) -> None:
    """A model's last task still running holds the host: taking another model now would load
    it beside the running one, and work for the first model may still come."""
    host, models = "http://gpu-a:11434", ["m-a:latest", "m-b:latest"]
    admit(sched, "a0", at=0, model=models[0])
    admit(sched, "b0", at=0.5, model=models[1])
    first = sched.release_for_host(host, models, 2, now=1)
    assert (first.model, first.switches, first.task_ids) == (models[0], 1, ["a0"])
    assert sched.started("a0", host=host, now=1)
    assert sched.release_for_host(host, models, 2, now=2).task_ids == []  # a0 still runs
    admit(sched, "a1", at=3, model=models[0])  # more work for the loaded model: it goes first
    assert sched.release_for_host(host, models, 2, now=3).task_ids == ["a1"]
    sched.finished("a0", models[0], now=4)
    sched.finished("a1", models[0], now=4)  # cancelled before it started, say: ends all the same
    step = sched.release_for_host(host, models, 2, now=4)
    assert (step.model, step.switches, step.task_ids) == (models[1], 1, ["b0"])


def test_a_host_switches_when_another_model_waited_too_long(raw: redis.Redis) -> None:
    sched = scheduler(raw, max_model_wait_s=30)
    host, models = "http://gpu-b:11434", ["m-a:latest", "m-b:latest"]
    sched.note_loaded(host, models[0], now=0)  # /api/ps says m-a is loaded: not a switch
    for i in range(10):
        admit(sched, f"a{i}", at=i, model=models[0])
    admit(sched, "b0", at=0.5, model=models[1])
    step = sched.release_for_host(host, models, 1, now=20)
    assert (step.model, step.switched, step.task_ids) == (models[0], False, ["a0"])
    run_one(sched, host, "a0", now=20)
    step = sched.release_for_host(host, models, 1, now=31)  # b0 has waited 30.5 s
    assert (step.model, step.switched, step.task_ids) == (models[1], True, ["b0"])
    run_one(sched, host, "b0", now=31)
    step = sched.release_for_host(host, models, 2, now=32)  # m-b has nothing left: back
    assert (step.model, step.switched, step.task_ids) == (models[0], True, ["a1", "a2"])
    state = sched.host_state(host)
    assert (state.model, state.since, state.switches) == (models[0], 32.0, 2)


def test_a_model_taken_by_force_keeps_the_host_for_the_max_wait(raw: redis.Redis) -> None:
    """Two models whose work waited too long do not take the host from each other in turn."""
    sched = scheduler(raw, max_model_wait_s=30)
    host, models = "http://gpu-b:11434", ["m-a:latest", "m-b:latest", "m-c:latest"]
    sched.note_loaded(host, models[0], now=0)
    for i in range(5):
        admit(sched, f"a{i}", at=i, model=models[0])
    admit(sched, "b0", at=1, model=models[1])
    admit(sched, "b1", at=1, model=models[1])
    admit(sched, "c0", at=2, model=models[2])
    step = sched.release_for_host(host, models, 1, now=40)  # b0 and c0 both waited > 30 s
    assert (step.model, step.task_ids) == (models[1], ["b0"])
    run_one(sched, host, "b0", now=40)
    step = sched.release_for_host(host, models, 1, now=41)  # m-b loaded 1 s ago: it stays
    assert (step.model, step.task_ids) == (models[1], ["b1"])
    run_one(sched, host, "b1", now=41)
    step = sched.release_for_host(host, models, 1, now=42)  # m-b done: the oldest, m-a's
    assert (step.model, step.task_ids) == (models[0], ["a0"])


def test_a_host_that_keeps_several_models_serves_them_side_by_side(sched: Scheduler) -> None:
    host, models = "http://gpu-c:11434", ["m-a:latest", "m-b:latest", "m-c:latest"]
    sched.note_loaded(host, [], resident=2, now=0)  # /api/ps was seen holding two models
    for i in range(3):
        for model in models:
            admit(sched, f"{model[:3]}{i}", at=i, model=model)
    capacity = dict.fromkeys(models, 2)  # each model has two slots over all workers
    step = sched.release_for_host(host, capacity, 4, now=5)
    assert sorted(step.task_ids) == ["m-a0", "m-a1", "m-b0", "m-b1"]
    assert sched.host_state(host).loaded == models[:2] and step.switches == 2
    for task in step.task_ids:
        run_one(sched, host, task, now=6)
    step = sched.release_for_host(host, capacity, 4, now=7)  # m-a and m-b keep their places
    assert sorted(step.task_ids) == ["m-a2", "m-b2"] and step.switches == 0
    for task in step.task_ids:
        run_one(sched, host, task, now=8)
    step = sched.release_for_host(host, capacity, 4, now=9)
    assert step.task_ids == ["m-c0", "m-c1"] and step.switches == 1
    assert sched.host_state(host).switches == 3


def test_a_host_releases_within_its_slots_and_each_models_capacity(sched: Scheduler) -> None:
    """Slots are the host's (its released and running tasks count); capacity is the model's
    over every host (its released and running tasks everywhere count)."""
    host, other = "http://gpu-d:11434", "http://gpu-e:11434"
    for i in range(6):
        admit(sched, f"t{i}", at=i)
    assert sched.release_for_host(other, {MODEL: 3}, 1, now=6).task_ids == ["t0"]
    assert sched.release_for_host(host, {MODEL: 3}, 5, now=6).task_ids == ["t1", "t2"]
    assert sched.started("t0", host=host, now=7)  # taken from the queue by a worker of host
    assert sched.release_for_host(other, {MODEL: 3}, 1, now=7).task_ids == []  # capacity
    sched.finished("t0", MODEL, now=8)
    assert sched.release_for_host(other, {MODEL: 3}, 1, now=8).task_ids == ["t3"]


def test_ps_is_taken_only_while_the_host_runs_nothing_released(sched: Scheduler) -> None:
    host, models = "http://gpu-f:11434", ["m-a:latest", "m-b:latest"]
    admit(sched, "b0", at=0, model=models[1])
    assert sched.release_for_host(host, models, 1, now=1).task_ids == ["b0"]
    assert not sched.note_loaded(host, models[0], now=2)  # b0 is on its way: m-a is stale
    assert sched.host_state(host).loaded == [models[1]]
    run_one(sched, host, "b0", now=2)
    assert sched.note_loaded(host, models[0], resident=1, now=3)
    state = sched.host_state(host)
    assert (state.loaded, state.switches) == ([models[0]], 1)  # /api/ps: not a switch


# -- position and ETA ---------------------------------------------------------------------------
def test_position_and_eta_follow_the_measured_service_rate(sched: Scheduler) -> None:
    for i in range(5):
        admit(sched, f"t{i}", at=i)
    assert sched.eta("t0", slots=2, now=5) is None  # no run time measured yet
    assert sched.finished("before-1", MODEL, run_s=10, now=5) == 10.0
    assert sched.finished("before-2", MODEL, run_s=20, now=5) == 12.0  # 0.2 × 20 + 0.8 × 10
    assert [sched.eta(f"t{i}", slots=2, now=5) for i in range(3)] == [0.0, 0.0, 6.0]
    assert sched.release(MODEL, 3, now=6) == ["t0", "t1", "t2"]
    assert sched.started("t0", now=100) and sched.started("t1", now=100)
    # t2 is released (in Celery's queue, next to start); t3 and t4 wait behind it.
    assert [sched.position(f"t{i}", now=101) for i in range(5)] == [None, None, 0, 1, 2]
    assert [sched.eta(f"t{i}", slots=2, now=101) for i in (2, 3, 4)] == [6.0, 12.0, 18.0]
    assert sched.finished("t0", MODEL, now=112) == pytest.approx(12.0)  # ran 12 s: mean stays
    assert sched.position("t0") is None and sched.eta("t0", slots=2) is None


def test_the_start_estimate() -> None:
    assert estimate_start_s(0, running=0, service_s=10, slots=2) == 0.0
    assert estimate_start_s(1, running=1, service_s=10, slots=2) == 5.0
    assert estimate_start_s(3, running=2, service_s=10, slots=2) == 20.0
    assert estimate_start_s(3, running=2, service_s=None, slots=2) is None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_positions_are_the_release_order(raw: redis.Redis, seed: int) -> None:
    """With the clock stopped, each task's position is exactly its index in the release order,
    across tenants, weights (one changed midway), priorities and ten aging bands."""
    sched = scheduler(raw, priority_aging_s=AGING_S)
    rng = random.Random(seed)
    tenants = {"t1": 1, "t2": 2, "t3": 3, "t4": 0.5}
    for tenant, weight in tenants.items():
        sched.set_tenant_weight(tenant, weight)

    def admit_between(start: float, end: float, count: int, prefix: str) -> None:
        for i, at in enumerate(sorted(rng.uniform(start, end) for _ in range(count))):
            tenant = rng.choice(list(tenants))
            admit(sched, f"{prefix}{i}", at=at, tenant=tenant, priority=rng.randint(0, 9))

    admit_between(0, 300, 120, "x")
    for task in sched.release(MODEL, 40, now=300):
        sched.started(task, now=300)
    sched.set_tenant_weight("t2", 5)
    admit_between(300, 600, 120, "y")
    now = 700.0
    everyone = [f"{prefix}{i}" for prefix in "xy" for i in range(120)]
    positions = {t: p for t in everyone if (p := sched.position(t, now=now)) is not None}
    pending = list(positions)
    assert len(pending) == 200
    order = [sched.release(MODEL, 1, now=now)[0] for _ in pending]
    assert sched.release(MODEL, 1, now=now) == []
    assert [positions[t] for t in order] == list(range(len(pending)))


def test_position_costs_the_same_for_a_small_and_a_large_backlog() -> None:
    """Redis commands per position call, counted by Redis itself: no walk over the backlog."""
    calls: dict[int, dict[str, int]] = {}
    took_ms: dict[int, float] = {}
    for size in (300, 20_000):
        with EmbeddedRedis() as server:
            client = redis.Redis.from_url(server.url)
            sched = Scheduler(client, load_settings(redis_url=server.url, max_queue_depth=10**6))
            pipe = client.pipeline(transaction=False)
            for i in range(size):  # three tenants, all priorities, a few aging bands
                at = i * 300 / size  # admit() itself, pipelined to fill the backlog faster
                args = sched._admit_args(message(f"t{i}"), MODEL, at, f"tenant-{i % 3}", i % 10, at)
                sched._admit(args=args, client=pipe)
                if i % 2000 == 1999:
                    pipe.execute()
            pipe.execute()
            probe = f"t{size // 2}"
            sched.position(probe, now=400)  # loads the script: count a steady call
            client.config_resetstat()
            started = time.perf_counter()
            assert sched.position(probe, now=400) is not None
            took_ms[size] = (time.perf_counter() - started) * 1000
            stats = client.info("commandstats")
            calls[size] = {k: v["calls"] for k, v in stats.items() if k != "cmdstat_config"}
            client.close()
    for size in calls:
        # At most one ZRANGE per other tenant, to break an exact tie of virtual times.
        assert calls[size].pop("cmdstat_zrange", 0) <= 2, (size, calls, took_ms)
    assert calls[300] == calls[20_000], (calls, took_ms)
    assert sum(calls[300].values()) <= 25


# -- cancel, start, finish ----------------------------------------------------------------------
def test_release_within_a_capacity_counts_released_and_running(sched: Scheduler) -> None:
    for i in range(6):
        admit(sched, f"t{i}", at=i)
    assert sched.release(MODEL, 1, now=6) == ["t0"]
    assert sched.started("t0", now=6)
    assert sched.release(MODEL, 10, capacity=3, now=7) == ["t1", "t2"]  # t0 runs: 2 free
    assert sched.release(MODEL, 10, capacity=3, now=8) == []
    assert sched.finished("t0", MODEL, now=9) == 3.0
    assert sched.release(MODEL, 10, capacity=3, now=9) == ["t3"]


def in_line(raw: redis.Redis) -> list[str]:
    """The tasks on the model's Celery queue, in the order workers take them (BRPOP: right end
    first)."""
    return [json.loads(m)["id"] for m in reversed(raw.lrange(queue_name(MODEL), 0, -1))]


def test_a_higher_band_goes_ahead_of_released_tasks_still_in_celerys_queue(
    sched: Scheduler, raw: redis.Redis
) -> None:
    """Released tasks wait in Celery's queue until a worker has a free thread, which comes a
    little after the scheduler counted the slot free. A task released later in a higher band is
    taken before them; within a band, first in, first out. Positions say the same order."""
    for i in range(3):
        admit(sched, f"low{i}", at=i, priority=0)
    assert sched.release(MODEL, 3, now=3) == ["low0", "low1", "low2"]
    raw.rpop(queue_name(MODEL))  # a worker takes low0 (its record clears the ledger entry)
    raw.hdel(LEDGER_KEY, "tag-low0")
    steps = [("mid0", 5), ("high0", 9), ("mid1", 5), ("high1", 9), ("low3", 0)]
    for i, (task, priority) in enumerate(steps):
        admit(sched, task, at=4 + i, priority=priority)
        assert sched.release(MODEL, 1, now=4 + i) == [task]
    line = ["high0", "high1", "mid0", "mid1", "low1", "low2", "low3"]
    assert in_line(raw) == line
    assert sched.started("low0", now=10)
    assert [sched.position(task) for task in line] == list(range(len(line)))
    # Each message still has its ledger entry: the sweep finds it on its queue, wherever it is.
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])
    assert sweep_ledger(raw, older_than_s=0, confirm_after_s=0) == ([], [])


def test_cancel_removes_a_pending_task_before_celery_sees_it(
    sched: Scheduler, raw: redis.Redis
) -> None:
    for i in range(3):
        admit(sched, f"t{i}", at=i)
    assert sched.cancel("t1") == "pending"
    assert sched.position("t1") is None and sched.cancel("t1") is None
    assert sched.position("t2", now=3) == 1
    assert release_all(sched, now=3) == ["t0", "t2"]
    assert raw.llen(queue_name(MODEL)) == 2
    assert sched.cancel("t0") == "released"  # in Celery's queue: cancel it the usual way
    assert raw.llen(queue_name(MODEL)) == 2


def test_a_task_started_without_release_is_never_released(sched: Scheduler) -> None:
    """E.g. its message also reached Celery another way: it must not run a second time."""
    admit(sched, "t0", at=0)
    admit(sched, "t1", at=1)
    assert sched.started("t0", now=2)
    assert release_all(sched, now=3) == ["t1"]
    assert sched.backlog(MODEL).running == 1
    assert not sched.started("never-admitted", now=4)


def test_leftover_released_entries_stop_counting_after_a_deadline(raw: redis.Redis) -> None:
    sched = scheduler(raw, max_queue_depth=2, task_deadline_s=100)
    admit(sched, "t0", at=0)
    admit(sched, "t1", at=0)
    sched.release(MODEL, 2, now=1)  # released; their workers never report
    assert not sched.admit(message("t2"), model=MODEL, submitted_at=50, now=50).admitted
    assert sched.admit(message("t2"), model=MODEL, submitted_at=102, now=102).admitted


# -- observability, restarts --------------------------------------------------------------------
def test_backlog_counts_by_band_and_tenant(sched: Scheduler) -> None:
    admit(sched, "a0", at=0, tenant="a", priority=0)
    admit(sched, "a1", at=100, tenant="a", priority=7)
    admit(sched, "b0", at=110, tenant="b", priority=9)
    sched.release(MODEL, 1, now=120)  # b0
    backlog = sched.backlog(MODEL, now=120)
    assert (backlog.pending, backlog.released, backlog.oldest_wait_s) == (2, 1, 120.0)
    assert backlog.by_tenant == {"a": 2}
    assert {b: n for b, n in backlog.by_band.items() if n} == {2: 1, 7: 1}  # 0 aged 2 steps
    assert sched.pending_counts([MODEL, "other:latest"]) == {MODEL: 2, "other:latest": 0}


def test_pending_work_survives_a_redis_restart(tmp_path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path, appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        sched = Scheduler(client, load_settings(redis_url=server.url))
        for i in range(12):
            admit(sched, f"t{i}", at=i, tenant="ab"[i % 2], priority=i % 3 * 4)
        sched.release(MODEL, 3, now=20)
        before = {f"t{i}": sched.position(f"t{i}", now=30) for i in range(12)}
        client.close()
        server.kill()  # SIGKILL: only what AOF has survives
        server.start()
        client = redis.Redis.from_url(server.url)
        sched = Scheduler(client, load_settings(redis_url=server.url))
        assert {t: sched.position(t, now=30) for t in before} == before
        assert client.llen(queue_name(MODEL)) == 3 and client.hlen(LEDGER_KEY) == 3
        order = release_all(sched, now=30)
        assert [before[t] for t in order] == list(range(3, 12))
        client.close()
    finally:
        server.stop()


def test_short_repr_cuts_as_celery_does() -> None:
    kwargs = {"payload": {"model": MODEL, "prompt": "x" * 2000}, "submitted_at": 1.0}
    assert short_repr({"a": 1}, 1024) == saferepr({"a": 1}, 1024) == "{'a': 1}"
    cut = short_repr(kwargs, 1024)
    assert len(cut) == 1024 and cut.endswith("...") and cut.startswith("{'payload': {'model'")


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        (),
        (1,),
        (1, "two"),
        {"a": [1, (2,)], "b": {"c": None, "d": "it's"}, 3: 4.5},
        "x" * 2000,
        [[[]]],
        [{"text": "é"}] * 300,
        {"embeddings": [[i / 7 for i in range(384)]] * 3, "model": MODEL},
        [[[[[[[[[[1]]]]]]]]]] * 40,
    ],
)
def test_short_repr_is_repr_cut_at_any_limit(value: object) -> None:
    text = repr(value)
    for limit in (0, 1, 3, 4, 10, 100, 256, 1024, 10_000):
        expected = text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."
        assert short_repr(value, limit) == expected, limit
