"""Admission, for every way in: priority and tenant, models nobody serves, the depth bound,
and cancelling work that still waits in the scheduler.

Most tests run on a Redis database of their own, where "served" is what the test says: a
worker announcement or an Ollama host's /api/tags (tests/wire_support.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests
from test_gateway_support import GatewayServer

from producers import Client, InvalidRequest, ModelNotFound, QueueFull
from tasks.keys import SCHED_SERVED_KEY, idempotency_key, log_key, queue_name, task_key
from tasks.scheduler.served import check_served
from tasks.settings import load_settings
from tests.wire_support import announce_idle_worker, offer, wait_until
from workers.embedded_redis import EmbeddedRedis

DB = 2
MODEL = "admitted-model:latest"


@pytest.fixture
def sdk(redis_server: EmbeddedRedis) -> Iterator[Client]:
    """A client on a database of its own, flushed before and after."""
    url = f"redis://{redis_server.host}:{redis_server.port}/{DB}"
    with Client(settings=load_settings(redis_url=url)) as client:
        client.redis.flushdb()
        yield client
        client.redis.flushdb()


def recorded(client: Client) -> int:
    return sum(1 for _ in client.redis.scan_iter(match=task_key("*")))


# -- priority and tenant --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"priority": 10}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": "9"}, "priority"),
        ({"tenant": "two words"}, "tenant"),
        ({"tenant": ""}, "tenant"),
    ],
)
def test_a_bad_priority_or_tenant_is_refused_naming_it(
    sdk: Client, options: dict, field: str
) -> None:
    offer(sdk.redis, [MODEL])
    with pytest.raises(InvalidRequest) as caught:
        sdk.generate(MODEL, "hi", **options)
    assert caught.value.field == field
    assert recorded(sdk) == 0 and sdk.scheduler.backlog(MODEL).pending == 0


def test_every_way_in_carries_priority_and_tenant(sdk: Client) -> None:
    offer(sdk.redis, [MODEL])
    jobs = [
        sdk.generate(MODEL, "hi", priority=9, tenant="team-a"),
        sdk.chat(MODEL, [{"role": "user", "content": "hi"}], priority=1, tenant="team-b"),
        sdk.structured(MODEL, {"type": "object"}, prompt="hi", priority=0),
    ]
    records = [job.record() for job in jobs]
    assert [(r["priority"], r["tenant"]) for r in records] == [
        ("9", "team-a"),
        ("1", "team-b"),
        ("0", "default"),
    ]
    assert [sdk.scheduler.position(job.id) for job in jobs] == [0, 1, 2]  # 9 before 1 before 0
    env = {**os.environ, "CORRAL_REDIS_URL": sdk.settings.redis_url}
    cli = [sys.executable, "-m", "producers.cli", "submit", "generate", MODEL, "hi"]
    run = subprocess.run(
        [*cli, "--priority", "7", "--tenant", "ops"],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert sdk.job(run.stdout.strip()).record()["priority"] == "7"
    assert sdk.job(run.stdout.strip()).record()["tenant"] == "ops"
    refused = subprocess.run(
        [*cli, "--priority", "10"], env=env, text=True, capture_output=True, timeout=60
    )
    assert refused.returncode == 2 and "--priority" in refused.stderr


def test_the_facade_takes_a_priority_header(sdk: Client) -> None:
    announce_idle_worker(sdk.redis, MODEL, slots=1)  # the facade wants a live worker
    with GatewayServer(sdk.settings) as server:
        url = f"{server.url}/api/generate"
        body = {"model": MODEL, "prompt": "hi", "stream": False}
        bad = requests.post(url, json=body, headers={"X-Corral-Priority": "soon"}, timeout=10)
        assert bad.status_code == 400 and "X-Corral-Priority" in bad.json()["error"]
        assert recorded(sdk) == 0

        def submit() -> None:  # the reply waits for the task, which nobody runs
            with contextlib.suppress(requests.Timeout):
                requests.post(url, json=body, headers={"X-Corral-Priority": "8"}, timeout=(5, 3))

        waiting = threading.Thread(target=submit, daemon=True)
        waiting.start()
        wait_until(lambda: recorded(sdk) == 1, what="the facade's task")
        task = next(sdk.redis.scan_iter(match=task_key("*"))).decode().removeprefix(task_key(""))
        assert sdk.job(task).record()["priority"] == "8"
        waiting.join(10)


# -- models nobody serves -------------------------------------------------------------------------
def test_a_model_nobody_serves_is_refused_with_the_closest_name(sdk: Client) -> None:
    offer(sdk.redis, ["llama3.2", "llava:7b"])
    with pytest.raises(ModelNotFound) as caught:
        sdk.generate("llama3.3", "hi")
    message = str(caught.value)
    assert "did you mean llama3.2?" in message and "served: llama3.2, llava:7b" in message
    assert caught.value.model == "llama3.3:latest" and not caught.value.retryable
    assert recorded(sdk) == 0 and not sdk.redis.exists(queue_name("llama3.3"))
    with pytest.raises(ModelNotFound, match="no worker serves any model yet"):
        sdk.redis.flushdb()
        sdk.generate("llama3.2", "hi")
    with GatewayServer(sdk.settings) as server:
        offer(sdk.redis, ["llama3.2"])
        native = requests.post(
            f"{server.url}/v1/tasks/generate",
            timeout=10,
            json={"model": "llama3.3", "prompt": "hi"},
        )
        assert native.status_code == 404
        assert native.json()["error"]["type"] == "ModelNotFound"
        assert "did you mean llama3.2?" in native.json()["error"]["message"]
        facade = requests.post(
            f"{server.url}/api/chat",
            timeout=10,
            json={"model": "Llama3.3", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert facade.status_code == 404
        assert facade.json() == {"error": "model 'Llama3.3' not found"}  # as Ollama says it
    assert recorded(sdk) == 0


def test_a_model_served_within_the_grace_period_still_counts(sdk: Client) -> None:
    """A rolling restart: the workers of a model are gone for a moment, its work is not
    refused (it waits for them)."""
    settings = load_settings(redis_url=sdk.settings.redis_url, model_grace_s=120)
    sdk.redis.zadd(SCHED_SERVED_KEY, {MODEL: time.time() - 100})  # last announced 100 s ago
    check_served(sdk.redis, MODEL, settings)
    sdk.redis.zadd(SCHED_SERVED_KEY, {MODEL: time.time() - 130})
    with pytest.raises(ModelNotFound):
        check_served(sdk.redis, MODEL, settings)
    announce_idle_worker(sdk.redis, MODEL)  # a live worker: served, whatever the grace
    check_served(sdk.redis, MODEL, load_settings(redis_url=sdk.settings.redis_url, model_grace_s=0))


@pytest.mark.usefixtures("worker")
def test_a_model_its_host_has_is_admitted_and_waits_for_a_worker(client: Client) -> None:
    """The session worker's Ollama host (the simulator) lists qwen2.5-coder:7b, which no
    worker serves: its task is admitted, and waits."""
    wait_until(
        lambda: client.redis.zscore("corral:sched:offered", "qwen2.5-coder:7b"),
        what="the host's /api/tags",
    )
    job = client.generate("qwen2.5-coder:7b", "hi")
    assert job.status() == "queued" and client.scheduler.position(job.id) is not None
    job.cancel()


# -- the depth bound ------------------------------------------------------------------------------
def test_the_bound_holds_under_parallel_sdk_clients(sdk: Client) -> None:
    offer(sdk.redis, [MODEL])
    sdk.scheduler.set_depth_bound(MODEL, 5)
    outcomes: Counter[str] = Counter()
    hints: list[float | None] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def producer(n: int) -> None:
        with Client(settings=sdk.settings) as own:
            barrier.wait(30)
            for i in range(5):
                try:
                    own.generate(MODEL, "hi", idempotency_key=f"p{n}-{i}")
                    got = "admitted"
                except QueueFull as exc:
                    got = "full"
                    with lock:
                        hints.append(exc.retry_after_s)
                with lock:
                    outcomes[got] += 1

    threads = [threading.Thread(target=producer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == {"admitted": 5, "full": 35}
    assert recorded(sdk) == 5  # nothing stored for the refused ones
    assert all(hint == 60 for hint in hints)  # nobody serves it: look again in a minute
    kept = {k for k in sdk.redis.scan_iter(match=idempotency_key("*"))}
    assert len(kept) == 5  # a refused submission keeps no idempotency key


# -- cancel ---------------------------------------------------------------------------------------
def test_cancel_of_pending_work_takes_it_out_before_celery_sees_it(sdk: Client) -> None:
    announce_idle_worker(sdk.redis, MODEL, slots=1)  # one slot: one released, the rest wait
    first = sdk.generate(MODEL, "first")
    second = sdk.generate(MODEL, "second")
    assert sdk.redis.llen(queue_name(MODEL)) == 1  # only the first was released
    assert second.cancel() == "cancelled"
    assert sdk.scheduler.position(second.id) is None
    assert sdk.scheduler.backlog(MODEL).pending == 0
    events = [e for _, e in sdk.redis.xrange(log_key(second.id))]
    assert len(events) == 1 and b'"cancelled"' in events[0][b"e"]
    sdk.scheduler.finished(first.id, MODEL)  # the slot frees: nothing is left to release
    assert sdk.releaser.for_model(MODEL) == []
    assert sdk.redis.llen(queue_name(MODEL)) == 1
    assert second.status() == "cancelled"


# -- many at a time -------------------------------------------------------------------------------
def test_submit_many_admits_each_task_as_submit_does_and_stops_at_a_refusal(sdk: Client) -> None:
    offer(sdk.redis, [MODEL])
    sdk.scheduler.set_depth_bound(MODEL, 5)
    with pytest.raises(InvalidRequest, match="prompt"):  # validated first: nothing is stored
        sdk.submit_many("generate", [{"model": MODEL, "prompt": "ok"}, {"model": MODEL}])
    assert recorded(sdk) == 0
    payloads = [{"model": MODEL, "prompt": f"p{i}"} for i in range(9)]
    with pytest.raises(QueueFull) as refused:
        sdk.submit_many("generate", payloads, priority=7, tenant="acme", chunk=3)
    # The first chunk went in whole, the second met the bound, the third was never sent.
    submitted = refused.value.info["submitted"]
    assert len(submitted) == 5 and recorded(sdk) == 5
    records = [sdk.job(task_id).record() for task_id in submitted]
    assert {(r["kind"], r["priority"], r["tenant"]) for r in records} == {("generate", "7", "acme")}
    assert sdk.submit_many("generate", [], chunk=3) == []
    with pytest.raises(ModelNotFound):
        sdk.submit_many("generate", [{"model": "nobody-serves-this", "prompt": "hi"}])
    assert recorded(sdk) == 5
