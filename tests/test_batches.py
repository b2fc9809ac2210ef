"""Batches end to end: a JSONL file in, OpenAI's output and error lines out, through the SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from webhook_receiver import WEBHOOK_ENV, Receiver, receiver_fixture  # noqa: F401

from benchmarks.batch_reader_rss import write_input
from producers import Batch, Client
from producers.batches import batch_id_of, list_batches
from producers.cli.local_stack import start_simulator, start_worker
from tasks.batches import (
    STORE_FILE,
    STORE_REDIS,
    BatchInfo,
    Line,
    create,
    describe,
    lines_of,
    load,
    read_output,
)
from tasks.batches import read_lines as read_lines
from tasks.batches.store import OUTPUT, Entry, LostWriter, Writer
from tasks.errors import InvalidRequest
from tasks.keys import batch_key, batch_lines_key, batch_open_key, batch_writer_key, task_key
from tasks.settings import Settings, load_settings
from tests.conftest import FAST_RETRIES
from tests.test_contract import png
from workers.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.usefixtures("worker")
WAIT_S = 60
LINE_KEYS = {"id", "custom_id", "response", "error"}


def chat(
    custom_id: str, content: Any = "Say hi.", model: str = "llama3.2", **extra: Any
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        **extra,
    }
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def bclient(settings: Settings, tmp_path: Path) -> Iterator[Client]:
    with Client(settings=settings.model_copy(update={"batch_dir": tmp_path / "b"})) as c:
        yield c


def test_small_batch_end_to_end(bclient: Client, tmp_path: Path) -> None:
    lines = [
        chat("c1"),
        {
            "custom_id": "t1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "llama3.2", "prompt": "Once upon", "max_tokens": 5},
        },
        {
            "custom_id": "n1",
            "method": "POST",
            "url": "/v1/tasks/generate",
            "body": {"model": "llama3.2", "prompt": "Hi", "options": {"num_predict": 4}},
        },
        chat(
            "m1",
            model="llava:7b",
            content=[
                {"type": "text", "text": "What is this?"},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(png()).decode()
                    },
                },
            ],
        ),
    ]
    batch = bclient.batch(write_jsonl(tmp_path / "in.jsonl", lines), key="e2e")
    assert isinstance(batch, Batch) and batch.id.startswith("batch_")
    seen: list[str] = []
    info = batch.wait(progress=lambda i: seen.append(i.status), timeout=WAIT_S)
    assert info.status == "completed", info
    assert (info.total, info.completed, info.failed) == (4, 4, 0)
    assert (info.priority, info.tenant) == (2, "default")
    task_id = bclient.redis.hget(batch_lines_key(batch.id), "c1")
    assert task_id is not None
    record = bclient.redis.hgetall(task_key(task_id.decode()))
    assert (record[b"priority"], record[b"tenant"]) == (b"2", b"default")  # the batch lane
    assert info.store == STORE_REDIS and seen[-1] == "completed"
    out = {line["custom_id"]: line for line in batch.results()}
    assert set(out) == {"c1", "t1", "n1", "m1"} and list(batch.errors()) == []
    for line in out.values():
        assert set(line) == LINE_KEYS and line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
    chat_body = out["c1"]["response"]["body"]
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["choices"][0]["message"]["content"]
    assert chat_body["usage"]["completion_tokens"] > 0
    assert out["t1"]["response"]["body"]["object"] == "text_completion"
    assert out["n1"]["response"]["body"]["result"]["text"]
    assert out["m1"]["response"]["body"]["choices"][0]["message"]["content"]
    openai = info.to_openai()
    assert openai["object"] == "batch" and openai["status"] == "completed"
    assert openai["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
    assert openai["completion_window"] == "24h" and openai["completed_at"]


def test_bad_lines_go_to_the_error_file_and_the_rest_run(bclient: Client, tmp_path: Path) -> None:
    lines = [
        chat("good"),
        "{not json",
        {"custom_id": "url", "method": "POST", "url": "/v1/images", "body": {}},
        chat("body", temperature=7),
        chat("unserved", model="nobody-serves"),
        chat("good"),  # a repeated custom_id
        {"method": "POST", "url": "/v1/chat/completions", "body": {}},
        chat("ghost", model="ghost-model"),  # a worker serves it; Ollama answers 404
        {"custom_id": "kind", "method": "POST", "url": "/v1/tasks/nope", "body": {}},
    ]
    batch = bclient.batch(write_jsonl(tmp_path / "in.jsonl", lines))
    info = batch.wait(timeout=WAIT_S)
    assert info.status == "completed" and (info.total, info.completed, info.failed) == (9, 1, 8)
    assert [line["custom_id"] for line in batch.results()] == ["good"]
    errors = list(batch.errors())
    assert all(set(line) == LINE_KEYS for line in errors)
    refused = {(e["custom_id"], e["error"]["code"]) for e in errors if e["response"] is None}
    assert refused == {
        (None, "invalid_request"),  # unparseable: no custom_id to name
        ("url", "invalid_request"),
        ("body", "invalid_request"),
        ("unserved", "model_not_found"),
        ("good", "invalid_request"),
        (None, "invalid_request"),
        ("kind", "invalid_request"),
    }
    messages = " | ".join(e["error"]["message"] for e in errors if e["error"])
    for needle in (
        "line 2: line 2 is not valid JSON",
        "'/v1/images' is not served",
        "temperature",
        "corral worker --model nobody-serves:latest",
        "already used",
        "custom_id: missing",
        "/v1/tasks/generate",
    ):
        assert needle in messages
    (ghost,) = [e for e in errors if e["response"] is not None]
    assert ghost["custom_id"] == "ghost" and ghost["error"] is None
    assert ghost["response"]["status_code"] == 404
    assert ghost["response"]["body"]["error"]["code"] == "model_not_found"


def test_every_line_bad_fails_the_batch(bclient: Client, tmp_path: Path) -> None:
    batch = bclient.batch(write_jsonl(tmp_path / "in.jsonl", ["[]", "{}"]))
    info = batch.status()
    assert info.status == "failed" and (info.total, info.failed) == (2, 2)
    assert len(list(batch.errors())) == 2


class Crash(Exception):
    pass


def test_a_resumed_submission_runs_no_line_twice(bclient: Client, tmp_path: Path, sim: Any) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat(f"l{i}", f"Line {i}") for i in range(12)])

    def crash_at(number: int) -> Any:
        def on_line(n: int) -> None:
            if n == number:
                raise Crash

        return on_line

    with pytest.raises(Crash):
        bclient.batch(path, on_line=crash_at(7))
    batch_id = batch_id_of("default", "", describe(path).file_id)
    submitted = bclient.redis.hgetall(batch_lines_key(batch_id))
    assert len(submitted) == 7
    # A crash between a line's submission and its record (one atomic step): as if the task
    # had been submitted and never recorded.
    pipe = bclient.redis.pipeline()
    pipe.hdel(batch_lines_key(batch_id), "l6")
    pipe.hdel(batch_open_key(batch_id), submitted[b"l6"])
    pipe.hincrby(batch_key(batch_id), "total", -1)
    pipe.execute()
    assert bclient.batch(path).id == batch_id  # the same file: the same batch, resumed
    info = Batch(bclient, batch_id).wait(timeout=WAIT_S)
    assert info.status == "completed" and (info.total, info.completed) == (12, 12)
    again = bclient.redis.hgetall(batch_lines_key(batch_id))
    assert {k: v for k, v in again.items() if k in submitted} == submitted  # same tasks
    out = [line["custom_id"] for line in Batch(bclient, batch_id).results()]
    assert sorted(out) == sorted(f"l{i}" for i in range(12))
    assert sim.stats()["requests"].get("POST /api/chat", 0) == 12  # each line ran once


def test_large_batches_write_files(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "b"
    small = settings.model_copy(update={"batch_dir": folder, "batch_redis_max_lines": 2})
    with Client(settings=small) as client:
        lines = [chat("a"), chat("b"), chat("c"), "oops"]
        batch = client.batch(write_jsonl(tmp_path / "in.jsonl", lines))
        info = batch.wait(timeout=WAIT_S)
        assert info.status == "completed" and info.store == STORE_FILE
        written = (folder / batch.id / "output.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["custom_id"] for x in written) == ["a", "b", "c"]
        assert [x["custom_id"] for x in batch.results()] == [
            json.loads(x)["custom_id"] for x in written
        ]
        assert [e["error"]["code"] for e in batch.errors()] == ["invalid_request"]
        assert not client.redis.exists(f"corral:batch:{batch.id}:output")


def test_list_newest_first_with_after_and_limit(bclient: Client, tmp_path: Path) -> None:
    ids = []
    for i in range(3):
        path = write_jsonl(tmp_path / f"in{i}.jsonl", [chat(f"x{i}")])
        ids.append(bclient.batch(path, owner="lister").id)
    first, more = list_batches(bclient, "lister", limit=2)
    assert [b.id for b in first] == ids[::-1][:2] and more
    rest, more = list_batches(bclient, "lister", after=first[-1].id, limit=2)
    assert [b.id for b in rest] == [ids[0]] and not more


@pytest.fixture(scope="module")
def wide_worker(redis_url: str, sim_url: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Four more slots, so that a few lines run while others still wait; it sends webhooks."""
    log = Path(tmp_path_factory.mktemp("logs")) / "wide-worker.log"
    child = start_worker(
        ["llama3.2", "deepseek-r1:14b"],
        redis_url=redis_url,
        ollama_host=sim_url,
        slots=4,
        name="wide@localhost",
        log_path=log,
        env={**FAST_RETRIES, **WEBHOOK_ENV},
    )
    yield child
    child.stop()


def stalled_batch(client: Client, tmp_path: Path, sim: Any, stalled: int, **options: Any) -> Batch:
    """Two quick lines, then ``stalled`` lines whose model goes silent for 30 s."""
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 30, "after_tokens": 1, "model": "deepseek-r1:14b"}]
        * stalled
    )
    lines = [chat("quick1"), chat("quick2")]
    lines += [chat(f"slow{i}", model="deepseek-r1:14b") for i in range(stalled)]
    batch = client.batch(write_jsonl(tmp_path / "in.jsonl", lines), **options)
    deadline = time.monotonic() + WAIT_S
    while batch.status().completed < 2:  # the quick lines end; the slow ones wait or stall
        assert time.monotonic() < deadline, "the quick lines did not finish"
        time.sleep(0.1)
    return batch


@pytest.mark.usefixtures("wide_worker")
def test_cancel_stops_queued_and_running_lines_and_keeps_what_finished(
    bclient: Client, tmp_path: Path, sim: Any
) -> None:
    batch = stalled_batch(bclient, tmp_path, sim, stalled=10)
    started = time.monotonic()
    assert batch.cancel().status == "cancelling"
    info = batch.wait(timeout=WAIT_S)
    assert info.status == "cancelled" and time.monotonic() - started < 10
    assert (info.total, info.completed, info.failed) == (12, 2, 10)
    assert sorted(x["custom_id"] for x in batch.results()) == ["quick1", "quick2"]
    errors = list(batch.errors())
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"} and len(errors) == 10
    assert all(e["response"] is None for e in errors)
    assert info.to_openai()["cancelled_at"] and info.to_openai()["cancelling_at"]
    assert Batch(bclient, batch.id).cancel().status == "cancelled"  # once ended, it stays


@pytest.mark.usefixtures("wide_worker")
def test_the_completion_window_expires_unfinished_lines(
    bclient: Client, tmp_path: Path, sim: Any
) -> None:
    batch = stalled_batch(bclient, tmp_path, sim, stalled=3, completion_window_s=3)
    info = batch.wait(timeout=WAIT_S)
    assert info.status == "expired" and (info.completed, info.failed) == (2, 3)
    assert {e["error"]["code"] for e in batch.errors()} == {"batch_expired"}
    assert info.to_openai()["expired_at"]


def corral_env(redis_url: str, folder: Path) -> dict[str, str]:
    return {
        **os.environ,
        **WEBHOOK_ENV,  # so that --callback-url is taken
        "CORRAL_REDIS_URL": redis_url,
        "CORRAL_BATCH_DIR": str(folder),
    }


def corral(redis_url: str, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", "batch", *args],
        env=corral_env(redis_url, folder),
        text=True,
        capture_output=True,
        timeout=WAIT_S,
    )


def test_cli_submit_wait_results_status_list(redis_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "b"
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), chat("b"), "{broken"])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    run = corral(
        redis_url,
        folder,
        "submit",
        str(source),
        "--wait",
        "-o",
        str(out),
        "--errors",
        str(err),
        "--owner",
        "cli",
    )
    assert run.returncode == 0, run.stderr
    batch_id = run.stderr.splitlines()[0]
    assert batch_id.startswith("batch_") and "completed, 3/3 done" in run.stdout
    assert f"{batch_id}: completed" in run.stderr  # the plain progress line (no terminal)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["a", "b"]
    assert all(set(x) == LINE_KEYS for x in lines)
    (error,) = [json.loads(x) for x in err.read_text().splitlines()]
    assert error["error"]["code"] == "invalid_request" and error["response"] is None
    again = corral(redis_url, folder, "submit", str(source), "--owner", "cli")
    assert again.stdout.strip() == batch_id  # the same file: the same batch, nothing rerun
    status = corral(redis_url, folder, "status", batch_id, "--json")
    assert json.loads(status.stdout)["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    copy = tmp_path / "copy.jsonl"
    fetched = corral(redis_url, folder, "results", batch_id, "-o", str(copy))
    assert fetched.returncode == 0 and len(copy.read_text().splitlines()) == 2
    listed = json.loads(corral(redis_url, folder, "list", "--owner", "cli", "--json").stdout)
    assert [b["id"] for b in listed["data"]] == [batch_id] and not listed["has_more"]
    unknown = corral(redis_url, folder, "status", "batch_nope")
    assert unknown.returncode == 1 and "corral batch list" in unknown.stderr


@pytest.mark.usefixtures("wide_worker")  # it has the secret: it delivers the webhook
def test_cli_submit_callback_url_gets_the_batch_webhook(
    redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("a"), "{broken"])
    hook = f"{receiver.url}/cli-batch"
    run = corral(redis_url, tmp_path / "b", "submit", str(source), "--callback-url", hook, "--wait")
    assert run.returncode == 0, run.stderr
    batch_id = run.stderr.splitlines()[0]
    [got] = receiver.wait("/cli-batch")
    payload = got.verified()  # signed with CORRAL_WEBHOOK_SECRET
    assert got.headers["webhook-id"] == f"msg_{batch_id}"
    assert payload["type"] == "batch.completed" and payload["data"]["id"] == batch_id
    assert payload["data"]["request_counts"] == {"total": 2, "completed": 1, "failed": 1}


def hear_ctrl_c() -> None:
    """In the child: SIGINT back to its default. A suite run from a background job inherits it
    ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.usefixtures("wide_worker")
def test_cli_ctrl_c_leaves_the_batch_running_then_cancel(
    redis_url: str, tmp_path: Path, sim: Any, client: Client
) -> None:
    # The stall is aimed at this line's text: a request left over from an earlier test (a
    # retry of a line that test stopped) can neither take it first nor be stalled instead.
    text = f"Say hi. [{uuid.uuid4().hex}]"
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 30, "after_tokens": 1, "prompt_contains": text}]
    )
    folder = tmp_path / "b"
    source = write_jsonl(tmp_path / "in.jsonl", [chat("slow", text, model="deepseek-r1:14b")])
    waiting = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "batch", "submit", str(source), "--wait"],
        env=corral_env(redis_url, folder),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=hear_ctrl_c,
    )
    assert waiting.stderr is not None
    batch_id = waiting.stderr.readline().strip()  # printed once submitted, before the wait
    Batch(client, batch_id)  # exists
    waiting.send_signal(signal.SIGINT)
    _, rest = waiting.communicate(timeout=WAIT_S)
    assert waiting.returncode == 130
    assert f"corral batch status {batch_id}" in rest and "keeps running" in rest
    assert Batch(client, batch_id).info().status == "in_progress"
    cancelled = corral(redis_url, folder, "cancel", batch_id)
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout
    assert Batch(client, batch_id).wait(timeout=WAIT_S).status == "cancelled"


def test_the_reader_streams_the_file(tmp_path: Path, settings: Settings) -> None:
    path = tmp_path / "big.jsonl"
    size = write_input(path, 3_000, 4_000)  # about 12 MB
    tracemalloc.start()
    try:
        valid = sum(
            isinstance(item, Line)
            for item in read_lines(lines_of(path), settings, lambda _model: True)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert valid == 3_000
    assert peak < size / 10, f"peak {peak} bytes while reading {size} bytes"


def file_batch(batch_id: str) -> BatchInfo:
    """A running batch whose outcomes go to files, for the writer tests."""
    now = time.time()
    return BatchInfo(
        id=batch_id,
        status="in_progress",
        owner="t",
        endpoint="",
        input_file_id="file-x",
        completion_window_s=60,
        created_at=now,
        expires_at=now + 60,
        store=STORE_FILE,
    )


def test_a_writer_that_died_before_its_commit_leaves_no_line_twice(
    client: Client, tmp_path: Path
) -> None:
    info = file_batch("batch_writer_test")
    create(client.redis, info)
    entries = [
        Entry(f"c{i}", f"t{i}", OUTPUT, json.dumps({"custom_id": f"c{i}"}), "completed")
        for i in range(3)
    ]
    first = Writer(client.redis, info, tmp_path)
    first.write(entries[:2])
    output = tmp_path / info.id / "output.jsonl"
    with open(output, "a") as handle:  # appended, then the process died before committing
        handle.write(json.dumps({"custom_id": "c2"}) + "\n")
    first.close_files()
    client.redis.delete(batch_writer_key(info.id))  # its lock lapsed
    second = Writer(client.redis, info, tmp_path)
    second.write(entries)  # everything again: c0 and c1 were written, c2 was not committed
    with pytest.raises(LostWriter):
        first.write(entries)  # the old writer cannot take the lock back while another holds it
    second.close()
    first.close()
    assert [json.loads(x)["custom_id"] for x in output.read_text().splitlines()] == [
        "c0",
        "c1",
        "c2",
    ]
    assert load(client.redis, info.id).completed == 3


class PausedWriter(Writer):
    """A writer stopped for longer than its lease between checking its lock and appending (a
    suspended process, a paused VM): ``meanwhile`` runs during the pause."""

    meanwhile: Callable[[], None] | None = None

    def written(self, keys: list[str]) -> list[bool]:
        found = super().written(keys)
        if self.meanwhile is not None:
            pause, self.meanwhile = self.meanwhile, None
            pause()
        return found


def test_a_writer_paused_past_its_lease_spoils_no_line_of_the_next_one(
    client: Client, tmp_path: Path
) -> None:
    info = file_batch("batch_paused_writer_test")
    create(client.redis, info)

    def entry(name: str, pad: int = 0) -> Entry:
        return Entry(
            name, f"t-{name}", OUTPUT, json.dumps({"custom_id": name, "p": "x" * pad}), "completed"
        )

    first = PausedWriter(client.redis, info, tmp_path)
    first.write([entry("c0")])
    second = Writer(client.redis, info, tmp_path)

    def lease_lapses_and_another_writer_takes_over() -> None:
        client.redis.delete(batch_writer_key(info.id))  # the first writer's lease lapsed
        with contextlib.suppress(LostWriter):  # the files stay the first's until its write ends
            second.write([entry("c2"), entry("c3")])

    first.meanwhile = lease_lapses_and_another_writer_takes_over
    with pytest.raises(LostWriter):
        first.write([entry("c1", pad=200)])  # appended once the pause ends, never committed
    second.write([entry("c2"), entry("c3")])  # what it could not write meanwhile, if anything
    second.write([entry("c1", pad=200)])  # the new writer writes it, from its stored outcome
    second.close()
    first.close()
    written = (tmp_path / info.id / "output.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in written] == ["c0", "c2", "c3", "c1"]
    assert [
        x["custom_id"] for x in map(json.loads, read_output(client.redis, info, tmp_path, OUTPUT))
    ] == ["c0", "c2", "c3", "c1"]
    assert load(client.redis, info.id).completed == 4


def test_a_commit_cut_by_lost_redis_leaves_no_line_twice(tmp_path: Path) -> None:
    """Redis vanishes between the append and the commit: whether the commit ran is unknown, so
    the writer's next write first cuts the files back to what Redis says was committed."""
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    # No retries of its own: the lost commit reaches the writer as the error it is.
    client = redis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    info = file_batch("batch_lost_commit_test")
    try:
        create(client, info)
        entries = [
            Entry(f"c{i}", f"t{i}", OUTPUT, json.dumps({"custom_id": f"c{i}"}), "completed")
            for i in range(3)
        ]
        writer = PausedWriter(client, info, tmp_path)
        writer.write(entries[:1])
        writer.meanwhile = server.kill  # after the check, before the append and the commit
        with pytest.raises(redis.ConnectionError):
            writer.write(entries[1:])
        server.start()
        writer.write(entries[1:])  # the same lines again, as the next collector step sends them
        writer.close()
        written = (tmp_path / info.id / "output.jsonl").read_text().splitlines()
        assert [json.loads(x)["custom_id"] for x in written] == ["c0", "c1", "c2"]
        assert load(client, info.id).completed == 3
    finally:
        client.close()
        server.stop()


@pytest.mark.usefixtures("wide_worker")
def test_cli_submit_killed_mid_submission_resumes_without_duplicates(
    redis_url: str, tmp_path: Path, client: Client
) -> None:
    folder = tmp_path / "b"
    count = 600
    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"k{i}", f"Line {i}") for i in range(count)])
    batch_id = batch_id_of("default", "", describe(source).file_id)
    first = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "batch", "submit", str(source)],
        env=corral_env(redis_url, folder),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + WAIT_S
    while client.redis.hlen(batch_lines_key(batch_id)) < 20:
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.005)
    first.kill()  # SIGKILL: no cleanup at all
    first.wait(timeout=WAIT_S)
    killed_at = client.redis.hlen(batch_lines_key(batch_id))
    assert killed_at < count, "the submission finished before it was killed"
    assert Batch(client, batch_id).info().status == "validating"
    again = corral(redis_url, folder, "submit", str(source))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == batch_id
    handle = Batch(client, batch_id)
    handle.cancel()  # no need to run 600 lines: what matters is that none is there twice
    info = handle.wait(timeout=WAIT_S)
    assert info.status == "cancelled" and info.total == count and info.done == count
    seen = [x["custom_id"] for x in handle.results()] + [x["custom_id"] for x in handle.errors()]
    assert sorted(seen) == sorted(f"k{i}" for i in range(count))
    tasks = client.redis.hgetall(batch_lines_key(batch_id))
    assert len(set(tasks.values())) == count


def test_bad_options_and_empty_files_are_refused_before_anything_is_stored(
    bclient: Client, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", [chat("z")])
    before = set(bclient.redis.scan_iter("corral:batch:*"))
    for options, field in (
        ({"priority": 12}, "priority"),
        ({"completion_window_s": -1}, "completion_window"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            bclient.batch(path, **options)
        assert refused.value.field == field
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InvalidRequest, match="no lines"):
        bclient.batch(tmp_path / "empty.jsonl")
    # Nothing new: keys of earlier tests' batches may expire meanwhile, none may appear.
    assert set(bclient.redis.scan_iter("corral:batch:*")) - before == set()


@pytest.mark.slow
def test_workers_and_redis_killed_mid_batch_lose_nothing_and_double_nothing(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    sim, sim_url = start_simulator(
        [
            "--tokens-per-second",
            "200",
            "--load-seconds",
            "0",
            "--first-token-seconds",
            "0",
            "--num-parallel",
            "2",
        ]
    )
    fast = {
        "CORRAL_VISIBILITY_TIMEOUT_S": "3",
        "CORRAL_LEASE_TTL_S": "1.5",
        "CORRAL_RETRY_BACKOFF_S": "0.05",
    }
    workers = [
        start_worker(
            ["llama3.2"],
            redis_url=server.url,
            ollama_host=sim_url,
            slots=2,
            name="first@chaos",
            env=fast,
        )
    ]
    settings = load_settings(redis_url=server.url).model_copy(
        update={"batch_dir": tmp_path / "b", "batch_redis_max_lines": 5}  # output in a file
    )
    count = 30
    lines = [chat(f"c{i}", f"Line {i}", max_tokens=30) for i in range(count)]
    try:
        with Client(settings=settings) as client:
            batch = client.batch(write_jsonl(tmp_path / "in.jsonl", lines))
            deadline = time.monotonic() + WAIT_S
            while batch.status().completed < 5:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert batch.info().completed < count, "the batch ended before the chaos began"
            batch.close()
            workers[0].kill()  # mid-task: its messages come back after the visibility timeout
            server.kill()  # and Redis with them
            server.start()
            workers.append(
                start_worker(
                    ["llama3.2"],
                    redis_url=server.url,
                    ollama_host=sim_url,
                    slots=2,
                    name="second@chaos",
                    env=fast,
                )
            )
        with Client(settings=settings) as client:  # a new process follows the batch
            info = Batch(client, batch.id).wait(timeout=90)
            assert info.status == "completed", info
            assert (info.total, info.completed, info.failed) == (count, count, 0)
            out = [x["custom_id"] for x in Batch(client, batch.id).results()]
            assert sorted(out) == sorted(f"c{i}" for i in range(count))  # each exactly once
            written = (tmp_path / "b" / batch.id / "output.jsonl").read_text().splitlines()
            assert len(written) == count
    finally:
        for worker in workers:
            worker.stop()
        sim.stop()
        server.stop()


def test_lines_given_as_objects_are_spooled_to_an_input_file(
    bclient: Client, tmp_path: Path
) -> None:
    batch = bclient.batch([chat("d1"), json.dumps(chat("d2"))], metadata={"team": "qa"})
    info = batch.wait(timeout=WAIT_S)
    assert info.status == "completed" and info.completed == 2
    assert info.metadata == {"team": "qa"} and info.to_openai()["metadata"] == {"team": "qa"}
    stored = tmp_path / "b" / "files" / f"{info.input_file_id}.jsonl"
    assert [json.loads(x)["custom_id"] for x in stored.read_text().splitlines()] == ["d1", "d2"]
    assert bclient.batch([chat("d1"), chat("d2")]).id == batch.id  # same lines, same batch


def test_embedding_lines_answer_openai_embedding_lists(bclient: Client, tmp_path: Path) -> None:
    def embed(custom_id: str, **extra: Any) -> dict[str, Any]:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "all-minilm", "input": ["red", "green"], **extra},
        }

    lines = [embed("f"), embed("b", encoding_format="base64"), embed("bad", input=[1, 2])]
    batch = bclient.batch(write_jsonl(tmp_path / "in.jsonl", lines), endpoint="/v1/embeddings")
    info = batch.wait(timeout=WAIT_S)
    assert info.status == "completed" and (info.completed, info.failed) == (2, 1)
    out = {x["custom_id"]: x["response"]["body"] for x in batch.results()}
    floats, packed = out["f"], out["b"]
    assert floats["object"] == "list" and floats["model"] == "all-minilm:latest"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in floats["data"])
    assert floats["usage"]["prompt_tokens"] > 0
    for plain, encoded in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(encoded["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(plain["embedding"], rel=1e-6, abs=1e-6)
    (bad,) = batch.errors()
    assert bad["custom_id"] == "bad" and bad["error"]["code"] == "invalid_request"
