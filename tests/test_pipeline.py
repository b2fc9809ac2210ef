"""End to end: SDK → Redis queue per model → real Celery worker → simulator, events on pub/sub."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
from pydantic import BaseModel

from producers import Client, UnservedModelWarning
from producers.jobs import Restart
from producers.unserved import NOTICE_AFTER_S
from tasks.errors import (
    InvalidRequest,
    ModelNotFound,
    OllamaRunnerError,
    StructuredOutputError,
    TaskNotFound,
    TaskTimeout,
)
from tasks.keys import blob_key, log_key, old_priority_lists, queue_name
from tasks.results import ChatResult, GenerateResult, MultimodalResult, StructuredResult
from tests.test_contract import png
from tests.wire_support import offer, old_priority_connection

pytestmark = pytest.mark.usefixtures("worker")
WAIT_S = 60


def test_generate_end_to_end(client: Client, sim) -> None:
    job = client.generate(
        "llama3.2", "Why is the sky blue?", options={"num_predict": 12, "seed": 7}
    )
    result = job.result(timeout=WAIT_S)
    assert isinstance(result, GenerateResult)
    assert result.model == "llama3.2:latest" and result.done_reason == "length"
    assert result.metrics.eval_count == 12 and len(result.text.split()) >= 6
    assert result.timings.started_at and result.timings.finished_at >= result.timings.started_at
    assert result.ollama_host == sim.url and result.worker
    assert job.status() == "succeeded"
    again = client.generate(
        "llama3.2", "Why is the sky blue?", options={"num_predict": 12, "seed": 7}
    )
    assert again.result(timeout=WAIT_S).text == result.text  # deterministic simulator
    assert result.context  # Ollama's token ids; passed back, the model continues from them
    follow_up = client.generate("llama3.2", "And then?", context=result.context)
    assert follow_up.result(timeout=WAIT_S).context


def test_stream_matches_result_for_early_and_late_subscribers(client: Client, sim) -> None:
    job = client.generate("llama3.2", "Tell a story.", options={"num_predict": 40})
    early: list[dict] = []
    reader = threading.Thread(target=lambda: early.extend(job.stream(timeout=WAIT_S)))
    reader.start()
    result = job.result(timeout=WAIT_S)
    reader.join(WAIT_S)
    late = list(job.stream(timeout=WAIT_S))  # attaches after the end: full replay
    for events in (early, late):
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert events[0]["type"] == "start" and events[-1]["type"] == "done"
        assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1
        assert "".join(e["text"] for e in events if e["type"] == "token") == result.text
    assert early == late
    assert "".join(job.text_stream()) == result.text


def test_chat_thinking_and_history(client: Client, sim) -> None:
    job = client.chat(
        "deepseek-r1:14b",
        [{"role": "user", "content": "Think, then answer."}],
        think=True,
        options={"num_predict": 30},
    )
    result = job.result(timeout=WAIT_S)
    assert isinstance(result, ChatResult)
    assert result.message.role == "assistant" and result.message.thinking
    types = [e["type"] for e in job.stream()]
    assert types.index("thinking") < types.index("token")


def test_conversation_keeps_history(client: Client, sim) -> None:
    book = client.conversation("llama3.2", system="You recommend books.")
    first = book.ask("Recommend a book about the sea.", timeout=WAIT_S)
    second = book.ask("Who wrote it?", timeout=WAIT_S)
    assert first and second
    assert [m["role"] for m in book.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert book.messages[2]["content"] == first and book.messages[4]["content"] == second


class Book(BaseModel):
    title: str
    author: str
    year: int


class Shelf(BaseModel):
    books: list[Book]


def test_structured_with_pydantic_model(client: Client, sim) -> None:
    result = client.structured("llama3.2", Shelf, prompt="Two books, please.").result(
        timeout=WAIT_S
    )
    assert isinstance(result, StructuredResult) and isinstance(result.data, Shelf)
    assert json.loads(result.raw_text) == result.data.model_dump()


def test_structured_corrects_one_invalid_reply(client: Client, sim) -> None:
    sim.faults(fail_next=[{"type": "invalid_format"}])
    schema = Shelf.model_json_schema()
    job = client.structured("llama3.2", schema, prompt="Two books.")
    result = job.result(timeout=WAIT_S)
    assert Shelf.model_validate(result.data)
    events = list(job.stream())
    restarts = [e for e in events if e["type"] == "restart"]
    assert len(restarts) == 1 and "invalid reply" in restarts[0]["reason"]


def test_structured_fails_typed_after_two_invalid_replies(client: Client, sim) -> None:
    sim.faults(fail_next=[{"type": "invalid_format"}, {"type": "invalid_format"}])
    job = client.structured("llama3.2", Shelf, prompt="Two books.")
    with pytest.raises(StructuredOutputError) as info:
        job.result(timeout=WAIT_S)
    assert info.value.raw_text is not None and "schema" in info.value.message


def test_multimodal_small_image_inline_and_large_by_reference(
    client: Client, sim, settings
) -> None:
    small = client.multimodal("llava:7b", "What is this?", [png(16, 9)]).result(timeout=WAIT_S)
    assert isinstance(small, MultimodalResult) and "16x9" in small.text.replace(" ", "")
    noise = png(900, 700)  # PNG of a flat colour is small: force size with random pixels
    import io  # noqa: E401
    import os

    from PIL import Image

    buffer = io.BytesIO()
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(buffer, format="PNG")
    big = buffer.getvalue()
    assert len(big) > settings.inline_image_max_bytes > len(noise) // 100
    job = client.multimodal("llava:7b", "Describe it.", [big])
    result = job.result(timeout=WAIT_S)
    assert "300x300" in result.text.replace(" ", "")
    import hashlib

    assert client.redis.exists(blob_key(hashlib.sha256(big).hexdigest()))
    message = client.redis.lrange("corral.llava:7b", 0, -1)  # already consumed: nothing waits
    assert message == []


def test_unknown_model_fails_permanently(client: Client, sim) -> None:
    job = client.generate("ghost-model", "hi")
    with pytest.raises(ModelNotFound) as info:
        job.result(timeout=WAIT_S)
    assert info.value.status == 404 and not info.value.retryable
    assert list(job.stream())[-1]["type"] == "error"


@pytest.mark.parametrize("status", [503, 500])
def test_transient_errors_are_retried(client: Client, sim, status: int) -> None:
    sim.faults(
        fail_next=[{"type": "status", "status": status}, {"type": "status", "status": status}]
    )
    result = client.generate("llama3.2", "hello", options={"num_predict": 5}).result(timeout=WAIT_S)
    assert result.metrics.eval_count == 5
    assert sim.stats()["responses_by_status"].get(str(status), 0) == 2


def test_mid_stream_crash_restarts_then_succeeds(client: Client, sim) -> None:
    sim.faults(fail_next=[{"type": "crash_after", "tokens": 3}])
    job = client.generate("llama3.2", "a long answer", options={"num_predict": 10})
    result = job.result(timeout=WAIT_S)
    events = list(job.stream())
    kinds = [e["type"] for e in events]
    assert kinds.count("restart") == 1 and kinds[-1] == "done" and result.attempts == 2
    after_restart = kinds.index("restart")
    tokens = [e["text"] for e in events[after_restart:] if e["type"] == "token"]
    assert "".join(tokens) == result.text
    pieces = list(job.text_stream())
    assert sum(isinstance(p, Restart) for p in pieces) == 1


def test_persistent_mid_stream_crash_ends_with_error_event(client: Client, sim) -> None:
    sim.faults(crash_after_tokens=2)
    job = client.generate("llama3.2", "doomed", options={"num_predict": 10})
    with pytest.raises(OllamaRunnerError) as info:
        job.result(timeout=WAIT_S)
    assert info.value.attempts == 3
    events = list(job.stream())
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "OllamaRunnerError"
    assert [e["seq"] for e in events] == list(range(len(events)))


def test_routing_keeps_models_apart(client: Client, sim) -> None:
    offer(client.redis, ["not-served-model"])  # a host has it; no worker serves it
    job = client.generate("not-served-model", "anyone?")
    assert job.status() == "queued"
    assert client.scheduler.pending_counts(["not-served-model:latest"]) == {
        "not-served-model:latest": 1
    }
    served = client.generate("llama3.2", "hi", options={"num_predict": 3}).result(timeout=WAIT_S)
    assert served.model == "llama3.2:latest"
    assert job.status() == "queued" and client.scheduler.position(job.id) == 0
    assert client.redis.llen("corral.not-served-model:latest") == 0  # never released: no slot
    job.cancel()


def test_waiting_on_a_model_no_worker_serves_warns(client: Client) -> None:
    """The task stays queued (a worker may still come), but the wait does not stay silent."""
    offer(client.redis, ["unserved-sdk-model"])  # on an Ollama host: admitted, and it waits
    job = client.generate("unserved-sdk-model", "anyone?")
    expected = "no worker serves corral.unserved-sdk-model:latest"
    with pytest.warns(UnservedModelWarning, match=expected), pytest.raises(TaskTimeout):
        job.result(timeout=NOTICE_AFTER_S + 2)
    start_one = "corral worker --model unserved-sdk-model"
    with pytest.warns(UnservedModelWarning, match=start_one), pytest.raises(TaskTimeout):
        list(job.stream(timeout=NOTICE_AFTER_S + 2))
    assert job.status() == "queued"
    job.cancel()
    client.redis.delete("corral.unserved-sdk-model:latest")


def test_bad_input_is_refused_before_enqueueing(client: Client) -> None:
    before = client.redis.llen("corral.llama3.2:latest")
    with pytest.raises(InvalidRequest, match="prompt"):
        client.generate("llama3.2", "   ")
    with pytest.raises(InvalidRequest, match="options.top_p"):
        client.generate("llama3.2", "x", options={"top_p": 3})
    with pytest.raises(InvalidRequest, match="raw mode does not support context"):
        client.generate("llama3.2", "x", raw=True, context=[1, 2])
    with pytest.raises(InvalidRequest, match="context"):
        client.generate("llama3.2", "x", context=[-1])
    assert client.redis.llen("corral.llama3.2:latest") == before


def test_raw_malformed_message_fails_one_task_not_the_worker(client: Client, sim) -> None:
    async_result = client.app.send_task(
        "corral.chat", kwargs={"payload": {"model": 5}}, queue="corral.llama3.2:latest"
    )
    with pytest.raises(InvalidRequest):
        async_result.get(timeout=WAIT_S, propagate=True)
    ok = client.generate("llama3.2", "still alive?", options={"num_predict": 2})
    assert ok.result(timeout=WAIT_S).metrics.eval_count == 2


def test_a_task_sent_around_the_scheduler_with_a_celery_priority_is_run(client: Client) -> None:
    """Another app may set Celery's priority; the broker keeps one list per queue, which is
    where the worker reads."""
    payload = {"model": "llama3.2", "prompt": "Hi.", "options": {"num_predict": 2}}
    sent = client.app.send_task(
        "corral.generate", kwargs={"payload": payload}, queue="corral.llama3.2:latest", priority=9
    )
    assert sent.get(timeout=WAIT_S)["metrics"]["eval_count"] == 2  # Celery's result: no task record


def test_unknown_task_id_is_not_pending_forever(client: Client) -> None:
    with pytest.raises(TaskNotFound):
        client.job("00000000-0000-0000-0000-000000000000").status()


def test_a_handle_that_submitted_its_task_waits_on_its_log_with_no_read_first(
    client: Client, sim
) -> None:
    """Its task exists and its end will be in its log: neither ``result()`` nor
    ``text_stream()`` reads the record or the result backend before subscribing (MONITOR sees
    every command Redis runs), while a handle on an id only still tells an unknown id apart."""
    monitor = client.redis.monitor()
    seen: list[str] = []
    with monitor:
        job = client.generate("llama3.2", "short", options={"num_predict": 3})
        text = "".join(job.text_stream(timeout=WAIT_S))
        assert job.result(timeout=WAIT_S).text == text
        client.redis.set(f"end-of-{job.id}", 1)
        while not (seen and f"end-of-{job.id}" in seen[-1]):
            seen.append(monitor.next_command()["command"])
    record_reads = [c for c in seen if c.startswith("HGETALL") and job.id in c]
    assert record_reads == [] and any(c.startswith("SUBSCRIBE") for c in seen)
    with pytest.raises(TaskNotFound):
        list(client.job(str(uuid.uuid4())).stream(timeout=WAIT_S))


def test_replay_log_is_capped_and_expires(client: Client, sim, settings) -> None:
    job = client.generate("llama3.2", "short", options={"num_predict": 3})
    job.result(timeout=WAIT_S)
    ttl = client.redis.ttl(log_key(job.id))
    assert 0 < ttl <= settings.stream_ttl_s


def test_idempotency_key_returns_the_first_task(client: Client, sim) -> None:
    offer(client.redis, ["parked-model"])
    pending = lambda: client.scheduler.backlog("parked-model").pending  # noqa: E731
    before = pending()
    first = client.generate("parked-model", "once", idempotency_key="order-42")
    second = client.generate("parked-model", "once", idempotency_key="order-42")
    assert second.id == first.id
    assert pending() == before + 1
    other = client.generate("parked-model", "once", idempotency_key="order-43")
    assert other.id != first.id
    for job in (first, other):
        job.cancel()


def test_a_worker_runs_what_an_earlier_version_left_in_priority_sublists(
    client: Client, redis_url, sim_url, tmp_path
) -> None:
    from producers.cli.local_stack import start_worker

    model = "qwen2.5-coder:7b"
    queue = queue_name(model)
    with old_priority_connection(client.app) as connection:
        sent = [
            client.app.send_task(
                "corral.generate",
                kwargs={"payload": {"model": model, "prompt": f"left at {p}"}},
                queue=queue,
                priority=p,
                connection=connection,
            )
            for p in (3, 9)
        ]
    assert all(client.redis.llen(list_) == 1 for list_ in old_priority_lists(queue)[::2])
    worker = start_worker(
        [model], redis_url=redis_url, ollama_host=sim_url, log_path=tmp_path / "w.log"
    )
    try:
        for result in sent:
            assert result.get(timeout=WAIT_S)["text"]
        assert not client.redis.exists(*old_priority_lists(queue))
    finally:
        worker.stop()


def test_connection_refused_is_retried_then_dead_lettered(
    client: Client, redis_url, tmp_path
) -> None:
    import socket

    from producers.cli.local_stack import start_worker
    from tasks.errors import OllamaUnavailable
    from tasks.lifecycle import dead_letters
    from tests.conftest import FAST_RETRIES

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    worker = start_worker(
        ["qwen2.5-coder:7b"],
        redis_url=redis_url,
        ollama_host=dead,
        name="dead-host@test",
        log_path=tmp_path / "w.log",
        env=FAST_RETRIES,
    )
    try:
        job = client.generate("qwen2.5-coder:7b", "anyone there?")
        with pytest.raises(OllamaUnavailable) as info:
            job.result(timeout=WAIT_S)
        assert info.value.attempts == 3 and info.value.retryable
        assert job.id in {r["task_id"] for r in dead_letters(client.redis)}
    finally:
        worker.stop()
