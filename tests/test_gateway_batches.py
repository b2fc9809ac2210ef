"""OpenAI's Batch API on the gateway, driven by the official ``openai`` client: files in, a
batch run by real workers against the simulator, output and error files out, and the batch's
one signed webhook verified by ``standardwebhooks``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import requests
from test_gateway_support import GatewayServer, settings_on_db
from webhook_receiver import SECRET, WEBHOOK_ENV, Receiver, receiver_fixture  # noqa: F401

from producers.batches import Driver, plan_batch
from producers.cli.local_stack import Child, start_worker
from producers.client import Client
from producers.gateway.auth import create_key
from producers.gateway.files import store_upload
from tasks.batches import STORE_FILE, Collector, create, load
from tasks.keys import BATCHES_ACTIVE_KEY, WEBHOOK_DUE_KEY, batch_key, webhook_key
from tasks.settings import Settings, load_settings
from tests.conftest import FAST_RETRIES, SimControl

WAIT_S = 60
DB = 12
SLOW = "deepseek-r1:14b"
WORKER_ENV = {**FAST_RETRIES, **WEBHOOK_ENV}


def chat(custom_id: str, model: str = "llama3.2", content: str = "Say hi.") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


@pytest.fixture(scope="module")
def hook_worker(
    redis_url: str, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    """Serves the batches' models and sends webhooks (it has the secret)."""
    child = start_worker(
        ["llama3.2", SLOW],
        redis_url=redis_url,
        ollama_host=sim_url,
        slots=4,
        log_path=tmp_path_factory.mktemp("logs") / "batch-worker.log",
        env=WORKER_ENV,
        name="batches@test",
    )
    yield child
    child.stop()


@pytest.fixture(scope="module")
def gw_settings(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings(
        redis_url=redis_url,
        batch_dir=tmp_path_factory.mktemp("batches"),
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1",
        batch_file_max_bytes=64 * 1024,
        batch_redis_max_lines=2,  # three lines or more: the output goes to files
    )


@pytest.fixture(scope="module")
def gateway(gw_settings: Settings, hook_worker: Child) -> Iterator[GatewayServer]:
    with GatewayServer(gw_settings) as server:
        yield server


@pytest.fixture
def oai(gateway: GatewayServer, sim: SimControl) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def wait_for(oai: openai.OpenAI, batch_id: str, *statuses: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while (batch := oai.batches.retrieve(batch_id)).status not in statuses:
        assert time.monotonic() < deadline, f"batch {batch_id} stayed {batch.status}"
        time.sleep(0.2)
    return batch


def lines_of(oai: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def upload(oai: openai.OpenAI, lines: list[dict[str, Any]], name: str = "in.jsonl") -> Any:
    return oai.files.create(file=(name, jsonl(lines)), purpose="batch")


def webhook_of(receiver: Receiver, path: str) -> dict[str, Any]:
    [got] = receiver.wait(path)
    payload: dict[str, Any] = got.verified()  # standardwebhooks checks the signature
    assert got.headers["webhook-id"] == f"msg_{payload['data']['id']}"
    return payload


def drained(client: redis.Redis, webhook_id: str) -> None:
    """Wait until the delivery left the outbox (sent and acknowledged)."""
    deadline = time.monotonic() + WAIT_S
    while client.zscore(WEBHOOK_DUE_KEY, webhook_id) is not None:
        assert time.monotonic() < deadline, f"{webhook_id} stayed in the outbox"
        time.sleep(0.05)


# -- end to end ------------------------------------------------------------------------------
def test_the_openai_client_runs_a_batch_end_to_end(
    oai: openai.OpenAI, receiver: Receiver, gw_settings: Settings
) -> None:
    lines = [chat("a"), chat("b", content="Name a colour."), chat("c", model="no-such-model")]
    uploaded = upload(oai, lines)
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.purpose, uploaded.filename, uploaded.bytes) == (
        "batch",
        "in.jsonl",
        len(jsonl(lines)),
    )
    assert oai.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert oai.files.content(uploaded.id).content == jsonl(lines)
    assert uploaded.id in [f.id for f in oai.files.list()]

    hook = f"{receiver.url}/batch-done"
    batch = oai.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"project": "labels", "callback_url": hook},
    )
    assert batch.id.startswith("batch_") and batch.object == "batch"
    assert batch.status in ("validating", "in_progress", "finalizing", "completed")
    assert batch.input_file_id == uploaded.id and batch.completion_window == "24h"
    assert batch.metadata == {"project": "labels", "callback_url": hook}

    done = wait_for(oai, batch.id, "completed", "failed")
    assert done.status == "completed" and done.completed_at and done.in_progress_at
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (3, 2)
    assert done.request_counts.failed == 1

    assert done.output_file_id and done.error_file_id
    output = lines_of(oai, done.output_file_id)
    assert sorted(x["custom_id"] for x in output) == ["a", "b"]
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"]
    [error] = lines_of(oai, done.error_file_id)
    assert error["custom_id"] == "c" and error["response"] is None
    assert error["error"]["code"] == "model_not_found"
    described = oai.files.retrieve(done.output_file_id)
    assert described.purpose == "batch_output"
    assert described.bytes == len(oai.files.content(done.output_file_id).content)

    payload = webhook_of(receiver, "/batch-done")
    assert payload["type"] == "batch.completed"
    data = payload["data"]
    assert (data["id"], data["status"], data["object"]) == (batch.id, "completed", "batch")
    assert data["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert data["output_file_id"] == done.output_file_id

    # Anyone who looks at the batch afterwards sends nothing more.
    with Client(settings=gw_settings) as sdk:
        assert load(sdk.redis, batch.id).store == STORE_FILE
        collector = Collector(sdk.redis, sdk.backend, sdk.settings, batch.id)
        assert collector.step().status == "completed"
        collector.close()
        drained(sdk.redis, f"msg_{batch.id}")
        assert sdk.redis.zscore(BATCHES_ACTIVE_KEY, batch.id) is None
    assert len(receiver.on("/batch-done")) == 1


def test_a_batch_names_an_output_or_error_file_only_once_it_has_one(oai: openai.OpenAI) -> None:
    """As OpenAI's: ``output_file_id`` only with output, ``error_file_id`` only with errors."""
    batch = oai.batches.create(
        input_file_id=upload(oai, [chat("ok")]).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert batch.status == "validating"
    assert batch.output_file_id is None and batch.error_file_id is None  # no line done yet
    done = wait_for(oai, batch.id, "completed", "failed")
    assert done.status == "completed" and done.error_file_id is None  # no line failed
    assert [x["custom_id"] for x in lines_of(oai, done.output_file_id or "")] == ["ok"]
    [listed] = [b for b in oai.batches.list() if b.id == batch.id]
    assert (listed.output_file_id, listed.error_file_id) == (done.output_file_id, None)


def test_cancel_keeps_what_finished_and_sends_batch_cancelled(
    oai: openai.OpenAI, receiver: Receiver, sim: SimControl
) -> None:
    stall = {"type": "stall", "seconds": 30, "after_tokens": 1, "model": SLOW}
    sim.faults(fail_next=[stall] * 6)
    lines = [chat("quick")] + [chat(f"slow{i}", model=SLOW) for i in range(6)]
    batch = oai.batches.create(
        input_file_id=upload(oai, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"callback_url": f"{receiver.url}/cancelled"},
    )
    deadline = time.monotonic() + WAIT_S
    while (seen := oai.batches.retrieve(batch.id)).request_counts.completed < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline and seen.status != "completed"
        time.sleep(0.1)
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait_for(oai, batch.id, "cancelled")
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 6)
    assert [x["custom_id"] for x in lines_of(oai, done.output_file_id or "")] == ["quick"]
    errors = lines_of(oai, done.error_file_id or "")
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and len(errors) == 6
    payload = webhook_of(receiver, "/cancelled")
    assert payload["type"] == "batch.cancelled" and payload["data"]["cancelled_at"]
    assert oai.batches.cancel(batch.id).status == "cancelled"  # once ended, it stays


def test_a_batch_of_bad_lines_fails_and_sends_batch_failed(
    oai: openai.OpenAI, receiver: Receiver
) -> None:
    lines = [chat("x", model="no-such-model"), {"custom_id": "y", "url": "/nowhere"}]
    batch = oai.batches.create(
        input_file_id=upload(oai, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"callback_url": f"{receiver.url}/failed"},
    )
    done = wait_for(oai, batch.id, "failed", "completed")
    assert done.status == "failed" and done.failed_at
    assert done.output_file_id is None  # no line succeeded: no output file
    assert len(lines_of(oai, done.error_file_id or "")) == 2
    payload = webhook_of(receiver, "/failed")
    assert payload["type"] == "batch.failed"
    assert payload["data"]["request_counts"] == {"total": 2, "completed": 0, "failed": 2}


def test_the_completion_window_expires_and_sends_batch_expired(
    oai: openai.OpenAI, receiver: Receiver, sim: SimControl
) -> None:
    sim.faults(fail_next=[{"type": "stall", "seconds": 30, "after_tokens": 1, "model": SLOW}] * 2)
    lines = [chat(f"slow{i}", model=SLOW) for i in range(2)]
    batch = oai.batches.create(
        input_file_id=upload(oai, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="3s",
        metadata={"callback_url": f"{receiver.url}/expired"},
    )
    done = wait_for(oai, batch.id, "expired", "completed", "failed")
    assert done.status == "expired" and done.expired_at and done.output_file_id is None
    assert {e["error"]["code"] for e in lines_of(oai, done.error_file_id or "")} == {
        "batch_expired"
    }
    assert webhook_of(receiver, "/expired")["type"] == "batch.expired"


def test_list_pages_with_after_limit_and_has_more(oai: openai.OpenAI) -> None:
    file_id = upload(oai, [chat("p")]).id
    made = [
        oai.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    assert len(set(made)) == 3  # every create is a new batch, even from the same file
    first = oai.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    rest = oai.batches.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == made[0]
    for batch_id in made:
        wait_for(oai, batch_id, "completed")


# -- a batch nobody is submitting any more --------------------------------------------------
@pytest.mark.usefixtures("hook_worker")
def test_a_driver_resumes_a_submission_whose_submitter_died(gw_settings: Settings) -> None:
    """A gateway died after recording a batch and before submitting its lines: the driver of
    any gateway submits them (the submitter's lease lapsed), and the batch completes."""
    with Client(settings=gw_settings) as sdk:
        content = jsonl([chat("r1"), chat("r2")])
        source = Path(gw_settings.batch_dir) / "resume.jsonl"
        source.write_bytes(content)
        with source.open("rb") as handle:
            stored = store_upload(sdk.redis, gw_settings.batch_dir, handle, "r.jsonl", "resumer")
        info = plan_batch(
            sdk,
            stored.input_file(gw_settings.batch_dir),
            owner="resumer",
            endpoint="/v1/chat/completions",
        )
        assert create(sdk.redis, info)
        driver = Driver(sdk, every_s=0.1)
        driver.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while (found := load(sdk.redis, info.id)).status != "completed":
                assert time.monotonic() < deadline, f"stayed {found.status}"
                time.sleep(0.1)
        finally:
            driver.stop()
        assert (found.total, found.completed) == (2, 2)


@pytest.mark.usefixtures("hook_worker")
def test_one_webhook_whichever_process_finalizes(
    gw_settings: Settings, receiver: Receiver, tmp_path: Path
) -> None:
    """A second process that finalizes the batch again (it read the batch before the first
    one ended it, and its lock lapsed meanwhile) enqueues no second delivery: the final status
    and the webhook are one step, under one id per batch."""
    with Client(settings=gw_settings) as sdk:
        path = tmp_path / "in.jsonl"
        path.write_bytes(jsonl([chat("one")]))
        batch = sdk.batch(path, callback_url=f"{receiver.url}/once", key="once")
        first = Collector(sdk.redis, sdk.backend, sdk.settings, batch.id)
        deadline = time.monotonic() + WAIT_S
        while first.step().status != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.close()
        sdk.redis.hset(batch_key(batch.id), "status", "in_progress")  # what the second saw
        second = Collector(sdk.redis, sdk.backend, sdk.settings, batch.id)
        assert second.step().status == "completed"
        second.close()
        drained(sdk.redis, f"msg_{batch.id}")
        assert sdk.redis.hget(webhook_key(f"msg_{batch.id}"), "delivered_at")
        payload = webhook_of(receiver, "/once")
        assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch.id
    assert len(receiver.on("/once")) == 1


# -- errors ----------------------------------------------------------------------------------
def test_bad_requests_get_openai_errors(oai: openai.OpenAI, gateway: GatewayServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.files.create(file=("in.jsonl", jsonl([chat("a")])), purpose="fine-tune")
    assert caught.value.param == "purpose" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as large:
        oai.files.create(file=("big.jsonl", b"x" * 200_000), purpose="batch")
    assert large.value.status_code == 413 and "bytes" in large.value.message
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-nothing")
    with pytest.raises(openai.NotFoundError):
        oai.batches.create(
            input_file_id="file-nothing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    file_id = upload(oai, [chat("a")]).id
    with pytest.raises(openai.BadRequestError) as endpoint:
        oai.batches.create(
            input_file_id=file_id,
            endpoint="/v1/images",  # type: ignore[arg-type]
            completion_window="24h",
        )
    assert endpoint.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as window:
        oai.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="soon",  # type: ignore[arg-type]
        )
    assert window.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError) as callback:
        oai.batches.create(
            input_file_id=file_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"callback_url": "http://10.0.0.1/hook"},  # a private address: no SSRF
        )
    assert callback.value.param == "callback_url"
    with pytest.raises(openai.NotFoundError):
        oai.batches.retrieve("batch_nothing")
    with pytest.raises(openai.NotFoundError):
        oai.batches.cancel("batch_nothing")
    with pytest.raises(openai.NotFoundError):
        oai.files.content("batch_nothing-output")
    deleted = oai.files.delete(file_id)
    assert (deleted.id, deleted.deleted) == (file_id, True)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(file_id)
    plain = requests.post(f"{gateway.url}/v1/files", data=b"not a form", timeout=10)
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "file"


@pytest.fixture
def keyed(gw_settings: Settings) -> Iterator[tuple[Settings, redis.Redis]]:
    isolated = settings_on_db(gw_settings.redis_url, DB).model_copy(
        update={"batch_dir": gw_settings.batch_dir}
    )
    client = redis.Redis.from_url(isolated.redis_url)
    client.flushdb()
    yield isolated, client
    client.flushdb()
    client.close()


def test_files_and_batches_belong_to_their_key(
    keyed: tuple[Settings, redis.Redis], sim_url: str, tmp_path: Path
) -> None:
    settings, client = keyed
    mine, _ = create_key(client, "mine", models=["llama3.2"])
    theirs, _ = create_key(client, "theirs")
    worker = start_worker(
        ["llama3.2", SLOW],
        redis_url=settings.redis_url,
        ollama_host=sim_url,
        slots=2,
        log_path=tmp_path / "worker.log",
        env=FAST_RETRIES,
        name="keyed@test",
    )
    with contextlib.ExitStack() as stack:
        stack.callback(worker.stop)
        server = stack.enter_context(GatewayServer(settings))
        base = f"{server.url}/v1"
        with (
            openai.OpenAI(base_url=base, api_key=mine, max_retries=0) as me,
            openai.OpenAI(base_url=base, api_key=theirs, max_retries=0) as other,
        ):
            file_id = upload(me, [chat("a"), chat("b", model=SLOW)]).id
            batch = me.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            done = wait_for(me, batch.id, "completed", "failed")
            assert done.status == "completed"
            assert [x["custom_id"] for x in lines_of(me, done.output_file_id or "")] == ["a"]
            [refused] = lines_of(me, done.error_file_id or "")
            assert refused["custom_id"] == "b"
            assert refused["error"]["code"] == "model_not_allowed"  # the key allows llama3.2
            for call in (
                lambda: other.files.retrieve(file_id),
                lambda: other.files.content(file_id),
                lambda: other.files.delete(file_id),
                lambda: other.batches.retrieve(batch.id),
                lambda: other.batches.cancel(batch.id),
                lambda: other.files.content(done.error_file_id or ""),
                lambda: other.batches.create(
                    input_file_id=file_id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                ),
            ):
                with pytest.raises(openai.NotFoundError):
                    call()
            assert other.batches.list().data == [] and other.files.list().data == []
            assert [b.id for b in me.batches.list().data] == [batch.id]
            assert me.files.retrieve(file_id).id == file_id
            with (
                openai.OpenAI(base_url=base, api_key="crl_x_y", max_retries=0) as stranger,
                pytest.raises(openai.AuthenticationError),
            ):
                stranger.files.list()
