"""Operations: the exporter's reads and metrics, and Flower, against real workers and Redis."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from monitoring.events import Outcomes, labels_from_event, labels_from_meta
from monitoring.flower import describe_kwargs
from monitoring.messages import parse_message
from monitoring.metrics import TaskMetrics
from monitoring.processes import Background, start_exporter, start_flower
from monitoring.snapshot import RedisSnapshot
from producers import Client
from tasks.errors import ModelNotFound
from tasks.keys import MODELS_KEY, queue_name, task_key, worker_key
from tasks.kinds import TASK_NAMES
from tasks.queues import sublists
from tasks.scheduler import Scheduler
from tasks.settings import load_settings
from tests.test_contract import png
from tests.test_scheduler import message
from tests.wire_support import announce_idle_worker
from workers.embedded_redis import EmbeddedRedis, free_port

WAIT_S = 60
AUTH = ("ops", "s3cret")


def sample_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by (name, labels)."""
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return values


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(check: Callable[[], object], timeout_s: float = 30.0, what: str = "") -> object:
    """Poll a real state (a page, a Redis key) until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or check}")


def kombu_message(client: Client, model: str) -> tuple[str, bytes]:
    """Submit to a model nobody serves and read the raw message kombu stored."""
    gone = announce_idle_worker(client.redis, model)  # released to it, then it went away
    job = client.generate(model, "waiting")
    client.redis.delete(worker_key(gone.node))
    raw = client.redis.lindex(queue_name(model), -1)
    assert raw is not None
    return job.id, raw


@pytest.fixture
def private_redis() -> Iterator[redis.Redis]:
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


@pytest.fixture
def orphan(client: Client) -> Iterator[str]:
    """A model with one waiting task and no worker; its queue is removed afterwards."""
    model = "orphan-model:1b"
    gone = announce_idle_worker(client.redis, model)  # released to it, then it went away
    client.generate(model, "nobody serves me")
    client.redis.delete(worker_key(gone.node))
    yield model
    # A purge, not a DEL: it also forgets the ledger entry, which the sweep would push back.
    with client.app.connection_for_write() as connection:
        connection.default_channel.queue_purge(queue_name(model))
    client.redis.delete(*sublists(queue_name(model)), f"_kombu.binding.{queue_name(model)}")
    client.redis.srem(MODELS_KEY, model)


# -- units ----------------------------------------------------------------------------------
def test_parse_message_reads_a_real_kombu_message(client: Client) -> None:
    model = "parse-probe:1b"
    try:
        task_id, raw = kombu_message(client, model)
        message = parse_message(raw)
        assert message is not None and message.task_id == task_id
        assert message.task_name == TASK_NAMES["generate"]
        assert message.submitted_at is not None and abs(message.submitted_at - time.time()) < 30
    finally:
        client.redis.delete(*sublists(queue_name(model)))
        client.redis.srem(MODELS_KEY, model)
    assert parse_message(None) is None and parse_message(b"not json") is None
    assert parse_message(b'{"headers": {"id": "x"}, "body": "%%%"}').submitted_at is None


def _message(task_id: str, submitted_at: float | None) -> bytes:
    kwargs = {"payload": {"model": "m"}} | ({"submitted_at": submitted_at} if submitted_at else {})
    body = base64.b64encode(f"[[], {_json(kwargs)}, {{}}]".encode()).decode()
    return _json(
        {
            "body": body,
            "headers": {"id": task_id, "task": "corral.generate"},
            "properties": {"body_encoding": "base64"},
        }
    ).encode()


def _json(value: object) -> str:
    import json

    return json.dumps(value)


def test_snapshot_counts_queues_reads_ages_and_caches(private_redis: redis.Redis) -> None:
    now = [1_000_000.0]
    snap = RedisSnapshot(private_redis, max_age_s=1.0, clock=lambda: now[0])
    queue = queue_name("llama3.2")
    private_redis.sadd(MODELS_KEY, "llama3.2:latest", "idle:1b")
    private_redis.lpush(queue, _message("c", now[0] - 90))  # the oldest, read first
    private_redis.lpush(queue, _message("d", None))  # age from first sight
    private_redis.lpush(queue, _message("a", now[0] - 30))
    private_redis.lpush(queue, _message("b", now[0] - 5))
    private_redis.hset("unacked", mapping={"t1": "x", "t2": "y"})
    private_redis.hset("corral:dlq", "t3", "{}")

    first = snap.get()
    states = {q.model: q for q in first.queues}
    assert states["llama3.2:latest"].waiting == 4 and states["idle:1b"].waiting == 0
    assert states["llama3.2:latest"].oldest_age_s == pytest.approx(90)
    assert states["idle:1b"].oldest_age_s == 0
    assert (first.unacked, first.dead_letters, first.ok) == (2, 1, True)
    assert snap.get() is first and snap.reads == 1  # cached within max_age_s

    def oldest() -> float:
        return {q.model: q.oldest_age_s for q in snap.get().queues}["llama3.2:latest"]

    private_redis.rpop(queue)
    now[0] += 2
    assert oldest() == 0  # "d" is first seen now
    now[0] += 12
    assert oldest() == pytest.approx(12) and snap.reads == 3


def test_snapshot_reads_constant_commands_per_model_and_tenant(private_redis: redis.Redis) -> None:
    models = [f"m{i}:latest" for i in range(10)]
    private_redis.sadd(MODELS_KEY, *models)
    for m in models:
        private_redis.lpush(queue_name(m), _message(m, time.time() - 1))
    sched = Scheduler(private_redis, load_settings())
    snap = RedisSnapshot(private_redis, max_age_s=0, discover_every_s=3600)

    def admit(count: int) -> None:
        for i in range(count):  # two tenants hold pending work for m0
            task_id = f"p{i}-{time.monotonic()}"
            sched.admit(
                message(task_id, "m0:latest"),
                model="m0:latest",
                submitted_at=time.time(),
                tenant="ab"[i % 2],
            )

    def commands() -> int:
        before = int(private_redis.info("stats")["total_commands_processed"])
        taken = snap.get()
        after = int(private_redis.info("stats")["total_commands_processed"])
        assert after - before == taken.commands + 1  # +1: INFO
        return taken.commands

    admit(4)
    snap.get()  # discovery happens here, once
    # 10 queues × (LLEN + LINDEX) + HLEN × 2 + HGET + SUNION + HGETALL of the wait histogram;
    # the scheduler: 6 per model, then 10 per tenant (2)
    assert commands() == 25 + 60 + 20
    admit(400)  # a longer backlog costs no more commands
    assert commands() == 25 + 60 + 20
    waiting = {q.model: q.waiting for q in snap.get().queues}
    assert waiting["m0:latest"] == 1 + 404 and waiting["m1:latest"] == 1


def scans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_discovery_finds_queues_and_hosts_through_their_indexes(
    private_redis: redis.Redis,
) -> None:
    """What corral writes keeps the indexes: the exporter scans once, at its start, for what
    older data holds (a queue declared by hand, a host's state), and never again."""
    pipe = private_redis.pipeline(transaction=False)
    for n in range(2000):  # what a backlog leaves in the keyspace: a record per task
        pipe.hset(task_key(f"t{n}"), mapping={"state": "queued"})
    pipe.execute()
    private_redis.sadd("_kombu.binding.corral.declared:latest", "binding")  # older data
    private_redis.hset("corral:sched:host:http://old:11434", mapping={"model": "old:latest"})
    sched = Scheduler(private_redis, load_settings())
    sched.admit(message("a1", "admitted:latest"), model="admitted:latest", submitted_at=time.time())
    assert sched.release_for_host("http://new:11434", ["admitted:latest"], 1).task_ids == ["a1"]
    sched.note_loaded("http://polled:11434", ["polled:latest"])
    gone = announce_idle_worker(private_redis, "served:latest")
    private_redis.delete(worker_key(gone.node))  # its queue stays known
    now = [time.time()]
    snap = RedisSnapshot(private_redis, max_age_s=0, discover_every_s=10, clock=lambda: now[0])

    first = snap.get()
    assert {q.model for q in first.queues} == {
        "declared:latest",
        "admitted:latest",
        "served:latest",
    }
    hosts = {h.host: h.model for h in first.scheduled_hosts}
    assert hosts == {
        "http://old:11434": "old:latest",
        "http://new:11434": "admitted:latest",
        "http://polled:11434": "polled:latest",
    }

    private_redis.config_resetstat()
    sched.admit(message("b1", "later:latest"), model="later:latest", submitted_at=time.time())
    sched.started("b1", host="http://later:11434")  # the host takes the model on
    now[0] += 10
    second = snap.get()  # a discovery, then a read
    assert "later:latest" in {q.model for q in second.queues}
    assert "http://later:11434" in {h.host for h in second.scheduled_hosts}
    assert scans(private_redis) == 0


def test_discovery_after_a_redis_restart_reads_the_persisted_indexes(tmp_path: Path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url)
        sched = Scheduler(client, load_settings())
        sched.admit(message("a1", "kept:latest"), model="kept:latest", submitted_at=time.time())
        sched.release_for_host("http://kept:11434", ["kept:latest"], 1)
        now = [time.time()]
        snap = RedisSnapshot(client, max_age_s=0, discover_every_s=10, clock=lambda: now[0])
        assert [q.model for q in snap.get().queues] == ["kept:latest"]
        server.stop()
        server.start()
        client.config_resetstat()
        now[0] += 10
        taken = snap.get()
        assert taken.ok and [q.model for q in taken.queues] == ["kept:latest"]
        assert [h.host for h in taken.scheduled_hosts] == ["http://kept:11434"]
        assert scans(client) == 0
        client.close()
    finally:
        server.stop()


def test_labels_come_from_queue_repr_or_backend_record() -> None:
    sent = {"name": "corral.chat", "queue": "corral.llava:7b", "kwargs": "{...}"}
    assert labels_from_event(sent) == ("chat", "llava:7b")
    received = {"name": "corral.generate", "kwargs": "{'payload': {'model': 'llama3.2:latest'"}
    assert labels_from_event(received) == ("generate", "llama3.2:latest")
    meta = {"name": "corral.structured", "queue": "corral.qwen2.5-coder:7b", "status": "FAILURE"}
    assert labels_from_meta(meta, ("unknown", "unknown")) == ("structured", "qwen2.5-coder:7b")
    assert labels_from_meta({}, ("chat", "m:1")) == ("chat", "m:1")


def test_outcomes_classify_errors_cancellations_and_dead_letters() -> None:
    registry = CollectorRegistry()
    outcomes = Outcomes(TaskMetrics.create(registry))

    def failure(cls: str, **info: object) -> dict:
        return {"exc_type": cls, "exc_module": "tasks.errors", "exc_message": ["boom", info]}

    outcomes.failed("generate", "m:1", failure("ModelNotFound", attempts=1))
    outcomes.failed("generate", "m:1", failure("OllamaUnavailable", attempts=3))
    outcomes.failed("chat", "m:1", failure("TaskCancelled"))
    timings = {"enqueued_at": 10.0, "started_at": 12.0, "first_token_at": 13.0, "finished_at": 15.0}
    metrics = {"eval_count": 50, "eval_duration": 2_000_000_000}
    outcomes.succeeded("chat", "m:1", {"attempts": 2, "metrics": metrics, "timings": timings})
    get = registry.get_sample_value
    assert (
        get(
            "corral_task_errors_total",
            {"kind": "generate", "model": "m:1", "error": "ModelNotFound", "retryable": "false"},
        )
        == 1
    )
    assert (
        get(
            "corral_task_errors_total",
            {"kind": "generate", "model": "m:1", "error": "OllamaUnavailable", "retryable": "true"},
        )
        == 1
    )
    assert get("corral_dead_letters_total", {"kind": "generate", "model": "m:1"}) == 1
    assert get("corral_task_retries_total", {"kind": "generate", "model": "m:1"}) == 2
    assert get("corral_task_retries_total", {"kind": "chat", "model": "m:1"}) == 1
    assert get("corral_task_cancellations_total", {"kind": "chat", "model": "m:1"}) == 1
    assert get("corral_tokens_generated_total", {"model": "m:1"}) == 50
    assert get("corral_generation_tokens_per_second_sum", {"model": "m:1"}) == 25
    assert get("corral_task_queue_wait_seconds_sum", {"kind": "chat", "model": "m:1"}) == 2
    assert get("corral_task_time_to_first_token_seconds_sum", {"kind": "chat", "model": "m:1"}) == 3
    assert get("corral_task_duration_seconds_sum", {"kind": "chat", "model": "m:1"}) == 5


def test_flower_task_summary_names_model_and_prompt() -> None:
    full = "{'payload': {'model': 'llama3.2:latest', 'prompt': 'Why is\\n the sky blue?'}, 'x': 1}"
    assert describe_kwargs(full) == "model=llama3.2:latest prompt='Why is the sky blue?'"
    chat = "{'payload': {'model': 'm:1', 'messages': [{'role': 'user', 'content': 'hi'}]}}"
    assert describe_kwargs(chat) == "model=m:1 messages=1 prompt='hi'"
    truncated = "{'payload': {'model': 'llava:7b', 'images': ['iVBORw0KGgo..."
    assert describe_kwargs(truncated) == "model=llava:7b"
    assert describe_kwargs("", "corral.deepseek-r1:14b") == "model=deepseek-r1:14b"


# -- the exporter, end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def exporter(redis_url: str, worker) -> Iterator[Background]:
    child = start_exporter(
        redis_url,
        extra=["--cache-seconds", "0.2", "--ps-interval", "0.3", "--discover-interval", "0.5"],
    )
    yield child
    child.stop()


def scrape(exporter: Background) -> dict:
    reply = requests.get(exporter.url + "/metrics", timeout=10)
    reply.raise_for_status()
    return sample_values(reply.text)


def test_exporter_counts_every_kind_with_latency_tokens_and_errors(
    exporter: Background, client: Client, sim, tmp_path: Path
) -> None:
    wait_until(
        lambda: value(scrape(exporter), "corral_exporter_event_receiver_up") == 1,
        what="the event receiver",
    )
    before = scrape(exporter)
    short = {"num_predict": 8}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    jobs = {
        ("generate", "llama3.2:latest"): client.generate("llama3.2", "Hi", options=short),
        ("chat", "deepseek-r1:14b"): client.chat(
            "deepseek-r1:14b", [{"role": "user", "content": "Hi"}], options=short
        ),
        ("structured", "llama3.2:latest"): client.structured("llama3.2", schema, prompt="One."),
        ("multimodal", "llava:7b"): client.multimodal(
            "llava:7b", "What?", [png(8, 8)], options=short
        ),
    }
    tokens: dict[str, float] = {}
    for (_, model), job in jobs.items():
        result = job.result(timeout=WAIT_S)
        tokens[model] = tokens.get(model, 0) + (result.metrics.eval_count or 0)
    ghost = client.generate("ghost-model", "Hi")
    with pytest.raises(ModelNotFound):
        ghost.result(timeout=WAIT_S)

    assert all(tokens.values()), tokens
    latest: dict = {}

    def delta(name: str, **labels: str) -> float:
        return value(latest, name, **labels) - value(before, name, **labels)

    def expected() -> Iterator[tuple[str, bool]]:
        for kind, model in jobs:
            for state in ("sent", "received", "started", "succeeded"):
                yield (
                    f"{kind} {model} {state}",
                    delta("corral_tasks_total", kind=kind, model=model, state=state) >= 1,
                )
            for hist in ("queue_wait", "time_to_first_token", "duration"):
                yield (
                    f"{kind} {model} {hist}",
                    delta(f"corral_task_{hist}_seconds_count", kind=kind, model=model) >= 1,
                )
        for model, count in tokens.items():
            yield f"{model} tokens", delta("corral_tokens_generated_total", model=model) >= count
            yield (
                f"{model} tokens/s",
                delta("corral_generation_tokens_per_second_count", model=model) >= 1,
            )
        ghost_labels = {"kind": "generate", "model": "ghost-model:latest"}
        yield "ghost failed", delta("corral_tasks_total", **ghost_labels, state="failed") >= 1
        yield (
            "ghost error",
            delta(
                "corral_task_errors_total", **ghost_labels, error="ModelNotFound", retryable="false"
            )
            >= 1,
        )

    # The exporter counts on its own thread, one metric after another, and a scrape reads one
    # family after another: one scrape can show a task's error and not yet its failed state.
    # So wait until every expected count has moved, rather than for one and assert the rest.
    missing: list[str] = []

    def counted() -> bool:
        latest.clear()
        latest.update(scrape(exporter))
        missing[:] = [what for what, moved in expected() if not moved]
        return not missing

    try:
        wait_until(counted, what="the outcomes to be counted")
    except AssertionError as exc:
        raise AssertionError(f"never counted: {missing}") from exc

    # The gauges read on scrape: workers, their Ollama host and what it has loaded.
    assert value(latest, "corral_workers", model="llava:7b") >= 1
    assert value(latest, "corral_ollama_up", host=sim.url) == 1

    # What the simulator holds is its own choice: a request of an earlier test still running
    # on a fourth model makes it evict one of these. The gauges must show what /api/ps says.
    def loaded_as_shown() -> set[str] | None:
        reply = requests.get(f"{sim.url}/api/ps", timeout=10)
        holds = {m["name"] for m in reply.json()["models"]}
        shown = {
            dict(labels)["model"]
            for (name, labels), v in scrape(exporter).items()
            if name == "corral_ollama_model_loaded" and v == 1 and dict(labels)["host"] == sim.url
        }
        return holds if holds and shown == holds else None

    loaded = wait_until(loaded_as_shown, what="the models /api/ps lists")
    assert loaded & {model for _, model in jobs}  # type: ignore[operator]
    assert value(latest, "corral_exporter_redis_up") == 1


def test_exporter_sees_depth_and_age_of_a_queue_without_workers(
    exporter: Background, orphan: str
) -> None:
    def waiting() -> dict | None:
        samples = scrape(exporter)
        labels = {"model": orphan, "queue": queue_name(orphan)}
        return samples if value(samples, "corral_queue_messages", **labels) == 1 else None

    samples = wait_until(waiting, what="the orphan queue in /metrics")
    age = value(
        samples,
        "corral_queue_oldest_message_age_seconds",
        model=orphan,  # type: ignore[arg-type]
        queue=queue_name(orphan),
    )
    assert 0 <= age < 60
    assert value(samples, "corral_workers", model=orphan) == 0  # type: ignore[arg-type]


def test_exporter_names_follow_prometheus_conventions(exporter: Background) -> None:
    text = requests.get(exporter.url + "/metrics", timeout=10).text
    names = {f.name for f in text_string_to_metric_families(text)}
    ours = {n for n in names if n.startswith("corral_")}
    assert {
        "corral_queue_messages",
        "corral_unacked_messages",
        "corral_tasks",
        "corral_task_duration_seconds",
        "corral_tokens_generated",
        "corral_messages_recovered",
    } <= ours
    for family in text_string_to_metric_families(text):
        if family.name.startswith("corral_") and family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    assert not re.search(r"^corral_\w*(_ms|_milliseconds)\b", text, re.M)


# -- Flower ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flower(
    redis_url: str, worker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background]:
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    child = start_flower(redis_url, basic_auth=":".join(AUTH), log_path=log)
    yield child
    child.stop()


def test_flower_requires_auth_and_lists_workers_by_model(flower: Background, worker) -> None:
    assert requests.get(flower.url + "/api/workers", timeout=10).status_code == 401
    workers = wait_until(
        lambda: requests.get(flower.url + "/api/workers?refresh=1", auth=AUTH, timeout=30).json(),
        what="Flower's workers",
    )
    assert worker.node_name in workers  # type: ignore[operator]
    assert worker.node_name.startswith("llama3.2+deepseek-r1-14b+llava-7b")
    queues = {q["name"] for q in workers[worker.node_name]["active_queues"]}  # type: ignore[index]
    assert queue_name("llava:7b") in queues


def test_flower_listens_on_loopback_only_by_default(flower: Background) -> None:
    process = psutil.Process(flower.process.pid)
    assert not any(arg.startswith("--address") for arg in process.cmdline())  # the default
    listening = [c.laddr for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and {address.ip for address in listening} == {"127.0.0.1"}


@pytest.mark.parametrize("address", ["", "--address=0.0.0.0"])
def test_flower_refuses_to_start_without_credentials(redis_url: str, address: str) -> None:
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "producers.cli", "flower", f"--port={free_port()}", address]
    run = subprocess.run(
        [a for a in argv if a], env=env, text=True, capture_output=True, timeout=60
    )
    assert run.returncode == 2, run.stderr
    assert "without authentication" in run.stderr and "--basic-auth" in run.stderr
    assert "--insecure-no-auth" in run.stderr


def test_flower_serves_open_only_when_told_insecure_no_auth(redis_url: str, tmp_path: Path) -> None:
    log = tmp_path / "flower.log"
    child = start_flower(redis_url, extra=["--insecure-no-auth", "--address=0.0.0.0"], log_path=log)
    try:
        assert requests.get(child.url + "/workers", timeout=10).status_code == 200
        assert "without authentication (--insecure-no-auth)" in log.read_text()
    finally:
        child.stop()


def test_flower_broker_tab_lists_queues_nobody_consumes(flower: Background, orphan: str) -> None:
    def lengths() -> dict:
        page = requests.get(flower.url + "/api/queues/length", auth=AUTH, timeout=10).json()
        return {q["name"]: q["messages"] for q in page["active_queues"]}

    found = wait_until(
        lambda: queue_name(orphan) in lengths() and lengths(),
        timeout_s=15,
        what="the orphan queue in Flower",
    )
    assert found[queue_name(orphan)] == 1  # type: ignore[index]
    assert queue_name("llama3.2") in found  # type: ignore[operator]
    html = requests.get(flower.url + "/broker", auth=AUTH, timeout=10).text
    assert queue_name(orphan) in html and queue_name("llava:7b") in html


def flower_send(flower: Background, kind: str, payload: dict) -> str:
    body = {
        "kwargs": {"payload": payload, "submitted_at": time.time()},
        "queue": queue_name(payload["model"]),
    }
    reply = requests.post(
        f"{flower.url}/api/task/send-task/{TASK_NAMES[kind]}", json=body, auth=AUTH, timeout=10
    )
    reply.raise_for_status()
    return str(reply.json()["task-id"])


def flower_result(flower: Background, task_id: str, wait_s: float = 0) -> dict:
    params = {"timeout": wait_s} if wait_s else {}
    reply = requests.get(
        f"{flower.url}/api/task/result/{task_id}", params=params, auth=AUTH, timeout=wait_s + 10
    )
    reply.raise_for_status()
    return dict(reply.json())


def test_flower_rest_submits_each_kind_and_returns_results(flower: Background, sim) -> None:
    image = base64.b64encode(png(8, 8)).decode()
    payloads = {
        "generate": {"model": "llama3.2", "prompt": "Hi", "options": {"num_predict": 6}},
        "chat": {
            "model": "deepseek-r1:14b",
            "messages": [{"role": "user", "content": "Hi"}],
            "options": {"num_predict": 6},
        },
        "structured": {
            "model": "llama3.2",
            "prompt": "A number.",
            "schema": {
                "type": "object",
                "properties": {"n": {"type": "integer"}},
                "required": ["n"],
            },
        },
        "multimodal": {
            "model": "llava:7b",
            "prompt": "What?",
            "images": [image],
            "options": {"num_predict": 6},
        },
    }
    ids = {kind: flower_send(flower, kind, p) for kind, p in payloads.items()}
    for kind, task_id in ids.items():
        flower_result(flower, task_id, wait_s=WAIT_S)
        reply = flower_result(flower, task_id)  # ?timeout= reports the state from before the wait
        assert reply["state"] == "SUCCESS", reply
        assert reply["result"]["kind"] == kind and reply["result"]["ollama_host"] == sim.url
    assert isinstance(flower_result(flower, ids["structured"])["result"]["data"]["n"], int)

    # The tasks page shows each task's kind (its name) and model.
    def listed() -> list:
        page = requests.get(
            flower.url + "/tasks/datatable",
            auth=AUTH,
            timeout=10,
            params={
                "draw": 1,
                "start": 0,
                "length": 100,
                "search[value]": ids["multimodal"],
                "order[0][column]": 0,
                "columns[0][data]": "received",
                "order[0][dir]": "desc",
            },
        ).json()
        return page["data"]

    rows = wait_until(listed, what="the task in Flower's table")
    assert rows[0]["name"] == TASK_NAMES["multimodal"]  # type: ignore[index]
    assert rows[0]["kwargs"].startswith("model=llava:7b prompt='What?' images=1")  # type: ignore[index]


def test_flower_rest_failure_reports_the_typed_error(flower: Background) -> None:
    task_id = flower_send(flower, "generate", {"model": "ghost-model", "prompt": "Hi"})
    flower_result(flower, task_id, wait_s=WAIT_S)
    reply = flower_result(flower, task_id)
    assert reply["state"] == "FAILURE" and "ModelNotFound" in reply["result"]


def flower_post(flower: Background, route: str, kind: str, body: dict) -> requests.Response:
    return requests.post(
        f"{flower.url}/api/task/{route}/{TASK_NAMES[kind]}", json=body, auth=AUTH, timeout=30
    )


def test_flower_rest_refuses_a_model_nobody_serves_with_the_typed_error(
    flower: Background,
) -> None:
    body = {"kwargs": {"payload": {"model": "nobody-serves-this", "prompt": "Hi"}}}
    reply = flower_post(flower, "send-task", "generate", body)
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert error["type"] == "ModelNotFound" and "llama3.2" in error["message"]


def test_flower_rest_submits_through_the_scheduler(
    flower: Background, client: Client, orphan: str
) -> None:
    """Flower's submit routes admit like the SDK: the scheduler's order, bound and checks."""
    payload = {"model": "llama3.2", "prompt": "Hi", "options": {"num_predict": 4}}
    body = {"kwargs": {"payload": payload}, "priority": 2, "tenant": "ops-batch"}
    sent = flower_post(flower, "send-task", "generate", body)
    assert sent.status_code == 200, sent.text
    task_id = sent.json()["task-id"]
    assert sent.json()["state"] == "PENDING" and isinstance(sent.json()["position"], int)
    record = client.redis.hgetall(task_key(task_id))
    assert (record[b"priority"], record[b"tenant"]) == (b"2", b"ops-batch")  # admitted
    assert client.job(task_id).result(timeout=WAIT_S).text
    applied = flower_post(
        flower, "apply", "generate", {"kwargs": {"payload": payload}, "timeout": WAIT_S}
    )
    assert applied.status_code == 200 and applied.json()["state"] == "SUCCESS", applied.text
    assert applied.json()["result"]["kind"] == "generate"

    # The depth bound holds for Flower too: the orphan model's one task fills a bound of 1.
    scheduler = Scheduler(client.redis, client.settings)
    scheduler.set_depth_bound(orphan, 1)
    try:
        orphan_body = {"kwargs": {"payload": {"model": orphan, "prompt": "Hi"}}}
        full = flower_post(flower, "async-apply", "generate", orphan_body)
        assert full.status_code == 429 and full.json()["error"]["type"] == "QueueFull"
        assert int(full.headers["Retry-After"]) >= 1
    finally:
        scheduler.set_depth_bound(orphan, None)

    # What would act around the scheduler is refused, naming the field.
    for extra, field in (({"countdown": 5}, "countdown"), ({"queue": "corral.x:1"}, "queue")):
        refused = flower_post(flower, "send-task", "generate", {**body, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == field
    positional = flower_post(flower, "send-task", "generate", {"args": [payload]})
    assert positional.status_code == 400 and positional.json()["error"]["field"] == "args"
