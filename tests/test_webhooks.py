"""Webhooks end to end: a real worker, real Redis, the simulator, a receiver in the test."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests
import svix.webhooks
from click.testing import CliRunner
from test_gateway_support import GatewayServer
from webhook_receiver import SECRET, WEBHOOK_ENV, Receiver, receiver_fixture  # noqa: F401

from producers.cli.local_stack import Child, start_worker
from producers.cli.main import cli
from producers.client import Client
from tasks.errors import InvalidRequest, TaskCancelled
from tasks.keys import WEBHOOK_DEAD_KEY, WEBHOOK_DUE_KEY, log_key, task_key
from tasks.settings import Settings, load_settings
from tasks.webhooks import check_callback_url, dead_webhooks, enqueue_webhook
from tasks.webhooks.deliverer import backoff_s
from tests.conftest import FAST_RETRIES, SimControl

WORKER_ENV = {
    **FAST_RETRIES,
    **WEBHOOK_ENV,
    "CORRAL_WEBHOOK_ATTEMPTS": "3",
    "CORRAL_WEBHOOK_BACKOFF_S": "0.2",
    "CORRAL_WEBHOOK_BACKOFF_MAX_S": "0.5",
    "CORRAL_WEBHOOK_TIMEOUT_S": "20",
}
MODELS = ("llama3.2", "ghost-model", "qwen2.5-coder:7b", "all-minilm")  # ghost: unknown to Ollama
ONLY_HERE = "qwen2.5-coder:7b"  # no worker of the session serves it: its slots are this one's


@pytest.fixture(scope="module")
def hook_settings(redis_url: str) -> Settings:
    return load_settings(
        redis_url=redis_url, webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1"
    )


@pytest.fixture(scope="module")
def hook_worker(
    redis_url: str, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    log = Path(tmp_path_factory.mktemp("logs")) / "webhook-worker.log"
    child = start_worker(
        MODELS,
        redis_url=redis_url,
        ollama_host=sim_url,
        slots=2,
        log_path=log,
        env=WORKER_ENV,
        name="webhooks@test",
    )
    yield child
    child.stop()


@pytest.fixture
def hooks(hook_settings: Settings, hook_worker: Child, sim: object) -> Iterator[Client]:
    with Client(settings=hook_settings) as client:
        yield client


def terminal_at(client: Client, task_id: str) -> float:
    """When the task's terminal event entered its log (Redis's clock, from the entry id)."""
    last = client.redis.xrevrange(log_key(task_id), count=1)
    return int(last[0][0].decode().split("-")[0]) / 1000


# -- deliveries -----------------------------------------------------------------------------
def test_success_is_delivered_signed_and_verifies_with_both_libraries(
    hooks: Client, receiver: Receiver
) -> None:
    job = hooks.generate("llama3.2", "hello", callback_url=f"{receiver.url}/ok")
    result = job.result(timeout=30)
    [got] = receiver.wait("/ok")
    payload = got.verified()
    svix.webhooks.Webhook(SECRET).verify(got.body, got.headers)  # raises unless it verifies
    assert got.headers["webhook-id"] == f"msg_{job.id}"
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert got.headers["webhook-signature"].startswith("v1,")
    assert payload["type"] == "task.succeeded"
    data = payload["data"]
    assert (data["id"], data["kind"], data["model"], data["status"]) == (
        job.id,
        "generate",
        "llama3.2:latest",
        "succeeded",
    )
    assert data["result"]["text"] == result.text
    assert "error" not in data
    with pytest.raises(standardwebhooks_error()):
        got.verified("whsec_" + "A" * 32)  # another secret does not verify


def standardwebhooks_error() -> type[Exception]:
    import standardwebhooks

    return standardwebhooks.WebhookVerificationError


def test_every_kind_takes_a_callback(hooks: Client, receiver: Receiver) -> None:
    job = hooks.embed("all-minilm", ["one", "two"], callback_url=f"{receiver.url}/embed")
    vectors = job.result(timeout=30).embeddings
    [got] = receiver.wait("/embed")
    data = got.verified()["data"]
    assert (data["kind"], data["status"]) == ("embed", "succeeded")
    assert data["result"]["embeddings"] == vectors


def test_failure_is_delivered_with_the_typed_error(hooks: Client, receiver: Receiver) -> None:
    job = hooks.generate("ghost-model", "hello", callback_url=f"{receiver.url}/failed")
    with pytest.raises(Exception, match="ghost-model"):
        job.result(timeout=30)
    [got] = receiver.wait("/failed")
    payload = got.verified()
    assert payload["type"] == "task.failed"
    assert payload["data"]["status"] == "failed"
    assert payload["data"]["error"]["type"] == "ModelNotFound"
    assert "result" not in payload["data"]


def test_cancel_of_a_queued_task_is_delivered(
    hooks: Client, receiver: Receiver, sim: SimControl
) -> None:
    # The first task stalls mid-stream, the second waits behind it in Ollama or stalls too:
    # both slots of the worker are taken, so the third task waits in line. The producer's
    # cancel ends it there, and its webhook is enqueued in the same script.
    stall = {"type": "stall", "seconds": 60, "after_tokens": 2, "model": ONLY_HERE}
    sim.faults(fail_next=[stall, stall])
    busy = [hooks.generate(ONLY_HERE, "Go on.")]
    next(e for e in busy[0].stream(timeout=30) if e["type"] == "token")  # stalled in Ollama
    busy.append(hooks.generate(ONLY_HERE, "Wait."))
    next(e for e in busy[1].stream(timeout=30) if e["type"] == "start")  # waits in Ollama
    try:
        job = hooks.generate(ONLY_HERE, "hi", callback_url=f"{receiver.url}/cancel-q")
        assert job.cancel() == "cancelled"
        [got] = receiver.wait("/cancel-q")
    finally:
        for stalled in busy:
            stalled.cancel()
    payload = got.verified()
    assert payload["type"] == "task.cancelled"
    assert payload["data"]["error"]["type"] == "TaskCancelled"
    assert payload["data"]["model"] == ONLY_HERE
    for stalled in busy:  # both end (cancelled, or done first), freeing the slots
        assert list(stalled.stream(timeout=30))[-1]["type"] in ("cancelled", "done")


def test_cancel_of_a_running_task_is_delivered(hooks: Client, receiver: Receiver, sim) -> None:
    sim.faults(fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "model": "llama3.2"}])
    job = hooks.generate("llama3.2", "Go on and on.", callback_url=f"{receiver.url}/cancel-r")
    next(e for e in job.stream(timeout=30) if e["type"] == "token")
    assert job.cancel() == "running"
    with pytest.raises(TaskCancelled):
        job.result(timeout=30)
    [got] = receiver.wait("/cancel-r")
    assert got.verified()["type"] == "task.cancelled"


def test_retry_after_500_then_200(hooks: Client, receiver: Receiver) -> None:
    receiver.statuses["/flaky"] = [500, 200]
    job = hooks.generate("llama3.2", "hi", callback_url=f"{receiver.url}/flaky")
    job.result(timeout=30)
    first, second = receiver.wait("/flaky", 2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == f"msg_{job.id}"
    assert second.verified()["type"] == "task.succeeded"
    assert second.at - first.at >= 0.2  # CORRAL_WEBHOOK_BACKOFF_S
    deadline = time.monotonic() + 10
    while hooks.redis.zscore(WEBHOOK_DUE_KEY, f"msg_{job.id}") is not None:  # settled after 200
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_dead_receiver_does_not_slow_tasks(hooks: Client, receiver: Receiver) -> None:
    """Four deliveries hang (every sender of the worker); tasks still run at full speed."""
    gate = threading.Event()
    receiver.hold["/stuck"] = gate
    try:
        first = [
            hooks.generate("llama3.2", f"p{i}", callback_url=f"{receiver.url}/stuck")
            for i in range(4)
        ]
        for job in first:
            job.result(timeout=30)
        receiver.wait_arrived("/stuck", 4)  # every sender now waits on the receiver
        started = time.monotonic()
        more = [
            hooks.generate("llama3.2", f"q{i}", callback_url=f"{receiver.url}/later")
            for i in range(6)
        ]
        for job in more:
            job.result(timeout=30)
        elapsed = time.monotonic() - started
        assert not receiver.on("/stuck")  # still hanging while the tasks ran
        assert elapsed < 20  # generous for a loaded machine; blocked slots would never end
    finally:
        gate.set()
    receiver.wait("/stuck", 4)
    receiver.wait("/later", 6)  # queued behind the stuck ones, delivered once they answered


def test_exhausted_attempts_go_to_dead_letters_and_retry_replays(
    hooks: Client, receiver: Receiver, redis_url: str
) -> None:
    receiver.statuses["/down"] = [503]
    job = hooks.generate("llama3.2", "hi", callback_url=f"{receiver.url}/down")
    job.result(timeout=30)
    receiver.wait("/down", 3)  # CORRAL_WEBHOOK_ATTEMPTS
    webhook_id = f"msg_{job.id}"
    deadline = time.monotonic() + 10
    while hooks.redis.zscore(WEBHOOK_DEAD_KEY, webhook_id) is None:
        assert time.monotonic() < deadline, "the delivery did not reach the dead letters"
        time.sleep(0.05)
    assert len(receiver.on("/down")) == 3
    env = {"CORRAL_REDIS_URL": redis_url}
    listed = CliRunner().invoke(cli, ["webhooks", "list", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    [dead] = [d for d in json.loads(listed.output) if d["id"] == webhook_id]
    assert dead["attempts"] == 3 and "503" in dead["last_error"]
    table = CliRunner().invoke(cli, ["webhooks", "list"], env=env)
    assert webhook_id in table.output and job.id in table.output

    receiver.statuses["/down"] = [200]
    missing = CliRunner().invoke(cli, ["webhooks", "retry", "msg_nope"], env=env)
    assert missing.exit_code == 2 and "corral webhooks list" in missing.output
    replayed = CliRunner().invoke(cli, ["webhooks", "retry", webhook_id], env=env)
    assert replayed.exit_code == 0, replayed.output
    assert f"{webhook_id}: due again" in replayed.output
    got = receiver.wait("/down", 4)[-1]
    assert got.verified()["data"]["id"] == job.id
    assert all(d.id != webhook_id for d in dead_webhooks(hooks.redis))


def test_enqueue_webhook_for_other_events(hooks: Client, receiver: Receiver) -> None:
    """What batches call: an event of their own, once per id however often it is enqueued."""
    url = f"{receiver.url}/batch"
    data = {"id": "batch_1", "status": "completed"}
    first = enqueue_webhook(hooks.redis, url, "batch.completed", data, webhook_id="msg_batch_1")
    enqueue_webhook(hooks.redis, url, "batch.completed", data, webhook_id="msg_batch_1")
    [got] = receiver.wait("/batch")
    assert first == "msg_batch_1" == got.headers["webhook-id"]
    assert got.verified() == {"type": "batch.completed", "data": data}


def test_delivery_p50_after_the_terminal_event(hooks: Client, receiver: Receiver) -> None:
    jobs = [
        hooks.generate("llama3.2", f"n{i}", callback_url=f"{receiver.url}/timed") for i in range(20)
    ]
    for job in jobs:
        job.result(timeout=60)
    got = {json.loads(r.body)["data"]["id"]: r.at for r in receiver.wait("/timed", 20)}
    lags = sorted(got[job.id] - terminal_at(hooks, job.id) for job in jobs)
    p50 = statistics.median(lags)
    print(
        f"\nwebhook delivery after the terminal event: p50 {p50 * 1000:.0f} ms, "
        f"max {lags[-1] * 1000:.0f} ms"
    )
    assert p50 < 2.0  # about 0.06 s on an idle machine


# -- refusals: SSRF and settings ------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "http://",
        "not a url",
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fd00::1]/hook",
        "http://224.0.0.1/hook",
        "http://127.1/hook",
        "http://2130706433/hook",  # 127.0.0.1 as one number
        "http://example.com:99999/hook",
        "http://[64:ff9b::7f00:1]/hook",  # NAT64 to 127.0.0.1
        "http://[2002:a00:1::1]/hook",  # 6to4 of 10.0.0.1
        "https://user:password@1.1.1.1/hook",
    ],
)
def test_callback_urls_refused(url: str, redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url, webhook_secret=SECRET)
    with pytest.raises(InvalidRequest) as caught:
        check_callback_url(url, settings)
    assert caught.value.field == "callback_url"
    assert "callback_url" in str(caught.value)


def test_allowed_hosts_and_public_addresses_pass(redis_url: str) -> None:
    settings = load_settings(
        redis_url=redis_url,
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1, Hooks.Internal",
    )
    assert check_callback_url("http://127.0.0.1:8080/x", settings)
    assert check_callback_url("https://[2606:4700::1111]/x", settings)  # a public literal
    assert check_callback_url("https://1.1.1.1/x", settings)
    with pytest.raises(InvalidRequest):
        check_callback_url("http://localhost/x", settings)  # allowed by name, not by address


def test_a_callback_without_a_secret_is_refused_and_nothing_is_stored(
    settings: Settings,
) -> None:
    with Client(settings=settings) as client:
        before = set(client.redis.scan_iter(match=task_key("*")))
        with pytest.raises(InvalidRequest, match="CORRAL_WEBHOOK_SECRET") as caught:
            client.generate("llama3.2", "hi", callback_url="https://1.1.1.1/x")
        assert caught.value.field == "callback_url"
        assert set(client.redis.scan_iter(match=task_key("*"))) - before == set()  # none new


def test_a_refused_callback_stores_nothing(hook_settings: Settings) -> None:
    with Client(settings=hook_settings) as client:
        before = set(client.redis.scan_iter(match=task_key("*")))
        with pytest.raises(InvalidRequest) as caught:
            client.generate("llama3.2", "hi", callback_url="http://10.0.0.1/x")
        assert caught.value.field == "callback_url"
        assert set(client.redis.scan_iter(match=task_key("*"))) - before == set()  # none new


def test_secret_setting_must_be_whsec(redis_url: str) -> None:
    from tasks.errors import InvalidSetting

    with pytest.raises(InvalidSetting, match="whsec_"):
        load_settings(redis_url=redis_url, webhook_secret="hunter2")
    with pytest.raises(InvalidSetting, match="whsec_"):
        load_settings(redis_url=redis_url, webhook_secret="whsec_c2hvcnQ=")  # 5 bytes
    assert load_settings(redis_url=redis_url, webhook_secret="").webhook_secret is None


def test_cli_callback_url(redis_url: str, receiver: Receiver, hook_worker: Child) -> None:
    env = {"CORRAL_REDIS_URL": redis_url, **WEBHOOK_ENV}
    ok = CliRunner().invoke(
        cli,
        ["submit", "generate", "llama3.2", "hi", "--wait", "--callback-url", f"{receiver.url}/cli"],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    assert receiver.wait("/cli")[0].verified()["type"] == "task.succeeded"
    refused = CliRunner().invoke(
        cli, ["submit", "generate", "llama3.2", "hi", "--callback-url", "http://10.0.0.1/"], env=env
    )
    assert refused.exit_code == 2
    assert "callback_url" in refused.output and "CORRAL_WEBHOOK_ALLOWED_HOSTS" in refused.output


def test_gateway_callback_url(
    hook_settings: Settings, hook_worker: Child, receiver: Receiver
) -> None:
    with GatewayServer(hook_settings) as gateway:
        url = f"{gateway.url}/v1/tasks/generate"
        body = {"model": "llama3.2", "prompt": "hi", "callback_url": f"{receiver.url}/gw"}
        accepted = requests.post(url, json=body, timeout=30)
        assert accepted.status_code == 202, accepted.text
        got = receiver.wait("/gw")[0].verified()
        assert got["data"]["id"] == accepted.json()["id"]
        refused = requests.post(
            url, json={**body, "callback_url": "http://169.254.169.254/"}, timeout=30
        )
        assert refused.status_code == 400
        assert refused.json()["error"]["field"] == "callback_url"


def test_delivery_time_check_refuses_a_private_address(hooks: Client, receiver: Receiver) -> None:
    """``localhost`` is not allowed by name (only 127.0.0.1 is): the connection is refused
    at delivery, whatever was checked before, and the receiver never sees it."""
    port = receiver.url.rsplit(":", 1)[1]
    webhook_id = enqueue_webhook(
        hooks.redis, f"http://localhost:{port}/rebound", "test.event", {"x": 1}
    )
    deadline = time.monotonic() + 20
    while hooks.redis.zscore(WEBHOOK_DEAD_KEY, webhook_id) is None:
        assert time.monotonic() < deadline, "the delivery was not given up"
        time.sleep(0.05)
    [dead] = [d for d in dead_webhooks(hooks.redis) if d.id == webhook_id]
    assert "not an allowed address" in dead.last_error
    assert not receiver.on("/rebound")


def test_backoff_doubles_up_to_its_cap(redis_url: str) -> None:
    settings = load_settings(redis_url=redis_url)
    waits = [backoff_s(n, settings) for n in range(1, settings.webhook_attempts)]
    assert waits[:3] == [10, 20, 40] and max(waits) == settings.webhook_backoff_max_s
    assert 20 * 3600 < sum(waits) < 28 * 3600  # about a day of retries by default


def test_public_surface_and_producers_load_no_delivery_parts() -> None:
    import subprocess
    import sys

    import tasks.webhooks

    for name in tasks.webhooks.__all__:
        assert hasattr(tasks.webhooks, name), name
    code = (
        "import sys, producers; loaded = [m for m in sys.modules if m.split('.')[0] in "
        "('requests', 'workers', 'standardwebhooks') or m == 'tasks.webhooks.deliverer']; "
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_claim_is_exclusive_until_its_lease_lapses(redis_url: str) -> None:
    """Two deliverers never hold the same attempt; a dead one's claim lapses (on database 9,
    where no worker of the tests delivers)."""
    from tasks.webhooks import outbox

    client = redis.Redis.from_url(f"{redis_url.rsplit('/', 1)[0]}/9")
    assert client.connection_pool.connection_kwargs["db"] == 9
    client.flushdb()
    try:
        webhook_id = enqueue_webhook(client, "https://1.1.1.1/x", "test.event", {"n": 1})
        [first] = outbox.claim(client, 10, lease_s=0.3)
        assert (first.id, first.attempt) == (webhook_id, 1)
        assert outbox.claim(client, 10, lease_s=0.3) == []  # held by the first claim
        deadline = time.monotonic() + 5
        while not (again := outbox.claim(client, 10, lease_s=30)):
            assert time.monotonic() < deadline, "the claim never lapsed"
            time.sleep(0.05)
        assert (again[0].id, again[0].attempt) == (webhook_id, 2)
        outbox.failed(client, first, "late answer of the lapsed claim", None)  # ignored
        assert client.zscore(WEBHOOK_DEAD_KEY, webhook_id) is None
        outbox.failed(client, again[0], "HTTP 500", None)  # the current claim gives up
        assert [w.id for w in dead_webhooks(client)] == [webhook_id]
    finally:
        client.flushdb()
        client.close()
