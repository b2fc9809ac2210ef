"""The `corral` command line, run as a subprocess like a user would."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from producers import Client
from producers.cli.main import cli
from tasks.errors import TaskCancelled
from tasks.keys import LEDGER_KEY, MODELS_KEY, SCHED_MODELS_KEY, queue_name
from tasks.queues import known_queues, purge_model
from tests.conftest import SimControl
from tests.wire_support import announce_idle_worker, offer

pytestmark = pytest.mark.usefixtures("worker")


def corral(
    redis_url: str, *args: str, timeout_s: float = 60, answer: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout_s,
        input=answer,
    )


def test_submit_stream_prints_tokens_then_result(redis_url: str, client: Client, sim) -> None:
    run = corral(
        redis_url,
        "submit",
        "generate",
        "llama3.2",
        "Why is the sky blue?",
        "-o",
        "num_predict=8",
        "-o",
        "seed=3",
        "--stream",
        "--wait",
    )
    assert run.returncode == 0, run.stderr
    text, _, result_json = run.stdout.partition("\n{")
    result = json.loads("{" + result_json)
    assert result["metrics"]["eval_count"] == 8
    assert text.strip() == result["text"].strip()


def test_submit_prints_id_then_result_and_stream_replay(redis_url: str, sim) -> None:
    run = corral(redis_url, "submit", "chat", "llama3.2", "hello", "-o", "num_predict=4")
    task_id = run.stdout.strip()
    assert run.returncode == 0 and len(task_id) == 36
    result = json.loads(corral(redis_url, "result", task_id, "--timeout", "30").stdout)
    assert result["task_id"] == task_id and result["message"]["role"] == "assistant"
    events = [
        json.loads(line)
        for line in corral(redis_url, "stream", task_id, "--json").stdout.splitlines()
    ]
    assert events[0]["type"] == "start" and events[-1]["type"] == "done"


def test_structured_and_multimodal(redis_url: str, tmp_path, sim) -> None:
    from tests.test_contract import png

    schema = tmp_path / "book.json"
    schema.write_text(
        json.dumps(
            {"type": "object", "required": ["title"], "properties": {"title": {"type": "string"}}}
        )
    )
    run = corral(
        redis_url, "submit", "structured", "llama3.2", "a book", "--schema", str(schema), "--wait"
    )
    assert run.returncode == 0, run.stderr
    assert isinstance(json.loads(run.stdout)["data"]["title"], str)
    image = tmp_path / "pic.png"
    image.write_bytes(png(40, 30))
    run = corral(
        redis_url,
        "submit",
        "multimodal",
        "llava:7b",
        "what is it?",
        "--image",
        str(image),
        "--wait",
    )
    assert "40x30" in json.loads(run.stdout)["text"].replace(" ", "")


def test_bad_input_exits_2_naming_the_field(redis_url: str) -> None:
    run = corral(redis_url, "submit", "generate", "llama3.2", "hi", "-o", "temprature=0.1")
    assert run.returncode == 2
    assert "options.temprature" in run.stderr and "next:" in run.stderr


def test_unknown_task_says_what_to_do(redis_url: str) -> None:
    run = corral(redis_url, "result", "11111111-2222-3333-4444-555555555555")
    assert run.returncode == 1 and "TaskNotFound" in run.stderr and "next:" in run.stderr


def test_queues_table_and_json(redis_url: str, client: Client) -> None:
    announce_idle_worker(client.redis, "queued-only-model")  # released: nothing consumes it
    client.generate("queued-only-model", "waiting")
    table = corral(redis_url, "queues").stdout
    assert "queued-only-model:latest" in table and "WAITING" in table
    rows = json.loads(corral(redis_url, "queues", "--json").stdout)
    depth = {r["model"]: r["waiting"] for r in rows}
    assert depth["queued-only-model:latest"] == 1
    client.redis.delete("corral.queued-only-model:latest")


def test_config_lists_every_setting(redis_url: str) -> None:
    from tasks.settings import Settings

    rows = json.loads(corral(redis_url, "config", "--json").stdout)
    from producers.gateway.config import GatewayConfig

    assert len(rows) == len(Settings.model_fields) + len(GatewayConfig.model_fields)
    assert {"env": "CORRAL_REDIS_URL", "default": "redis://127.0.0.1:6379/0"}.items() <= rows[
        0
    ].items()


def test_dead_letters_can_be_listed_retried_and_purged(redis_url: str, client: Client, sim) -> None:
    from tasks.lifecycle import add_dead_letter, dead_letters

    payload = {"model": "llama3.2:latest", "prompt": "try me again", "options": {"num_predict": 3}}
    error = {"type": "OllamaOverloaded", "message": "Ollama is overloaded", "retryable": True}
    add_dead_letter(
        client.redis, "dead-1", {"kind": "generate", "payload": payload, "error": error}
    )
    add_dead_letter(
        client.redis, "dead-2", {"kind": "generate", "payload": payload, "error": error}
    )
    listed = json.loads(corral(redis_url, "dlq", "list", "--json").stdout)
    assert {"dead-1", "dead-2"} <= {r["task_id"] for r in listed}
    assert "OllamaOverloaded" in corral(redis_url, "dlq", "list").stdout
    run = corral(redis_url, "dlq", "retry", "dead-1")
    assert run.returncode == 0, run.stderr
    new_id = run.stdout.split("→")[1].strip()
    assert client.job(new_id).result(timeout=30).metrics.eval_count == 3
    assert "dead-1" not in {r["task_id"] for r in dead_letters(client.redis)}
    assert corral(redis_url, "dlq", "purge", "--yes").returncode == 0
    assert dead_letters(client.redis) == []


def test_waiting_on_an_unserved_queue_says_so(redis_url: str, client: Client) -> None:
    offer(client.redis, ["lonely-model"])  # on an Ollama host, but no worker serves it
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "producers.cli", "submit", "generate", "lonely-model", "hi"]
    process = subprocess.Popen(
        [*argv, "--stream"], env=env, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert process.stderr is not None
    process.stderr.readline()  # the task's id
    line = process.stderr.readline()  # the note comes before any waiting
    process.kill()
    process.wait(10)
    process.stderr.close()
    assert "no worker serves corral.lonely-model:latest" in line
    assert "corral worker --model lonely-model:latest" in line
    assert purge_model(client.redis, client.backend, "lonely-model", client.settings).ended


def test_queues_purge_ends_the_tasks_of_a_model_nobody_serves(
    redis_url: str, client: Client
) -> None:
    """Work admitted for a model that an Ollama host lists but no worker serves waits in the
    scheduler; the purge ends it there, before it ever reaches Celery."""
    offer(client.redis, ["lama3-typo"])
    jobs = [client.generate("lama3-typo", f"lost {i}") for i in range(2)]
    queue = "corral.lama3-typo:latest"
    run = corral(redis_url, "queues", "purge", "lama3-typo", "--yes", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["queue"], report["messages"]) == (queue, 2)
    assert sorted(report["cancelled"]) == sorted(job.id for job in jobs)
    for job in jobs:  # nobody waits forever on a purged task
        assert job.status() == "cancelled"
        assert [e["reason"] for e in job.stream(timeout=10)] == ["queue purged"]
        with pytest.raises(TaskCancelled, match="queue purged"):
            job.result(timeout=10)
    assert client.scheduler.backlog("lama3-typo").pending == 0
    listed = json.loads(corral(redis_url, "queues", "--json").stdout)
    assert queue not in {row["queue"] for row in listed}  # empty and unserved: not shown
    assert not any(queue.encode() in entry for entry in client.redis.hvals(LEDGER_KEY))
    assert not client.redis.sismember(MODELS_KEY, "lama3-typo:latest")
    assert not client.redis.sismember(SCHED_MODELS_KEY, "lama3-typo:latest")
    assert queue not in known_queues(client.redis)  # forgotten: the exporter drops it too


def test_queues_purge_says_what_it_removed(redis_url: str, client: Client) -> None:
    offer(client.redis, ["mistral-typo"])
    job = client.generate("mistral-typo", "lost")
    run = corral(redis_url, "queues", "purge", "mistral-typo", "--yes")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "purged corral.mistral-typo:latest: 1 waiting messages removed, 1 tasks cancelled",
        f"  {job.id}: cancelled (queue purged)",
    ]


def test_queues_purge_refuses_a_served_queue(redis_url: str, client: Client) -> None:
    run = corral(redis_url, "queues", "purge", "llama3.2", "--yes")
    assert run.returncode == 2
    assert "live workers serve corral.llama3.2:latest" in run.stderr and "--force" in run.stderr
    listed = {row["queue"]: row for row in json.loads(corral(redis_url, "queues", "--json").stdout)}
    assert listed["corral.llama3.2:latest"]["workers"] >= 1  # served: shown even when empty


# -- what `corral submit` reads and shows --------------------------------------------------
def queued_payload(client: Client, model: str) -> dict[str, Any]:
    """The payload of the newest task waiting on ``model``'s queue (a model nobody serves)."""
    raw = client.redis.lindex(queue_name(model), 0)
    assert raw is not None, f"nothing waits on {queue_name(model)}"
    return json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["payload"]


def error_lines(run: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of stderr other than the `next:` hint every typed error ends with."""
    return [line for line in run.stderr.splitlines() if not line.startswith("  next:")]


def test_stream_and_wait_show_the_task_id_on_stderr_first(
    redis_url: str, client: Client, sim
) -> None:
    streamed = corral(
        redis_url,
        "submit",
        "generate",
        "llama3.2",
        "Why is the sky blue?",
        "-o",
        "num_predict=6",
        "--stream",
    )
    assert streamed.returncode == 0, streamed.stderr
    first, task_id = streamed.stderr.splitlines()[0].split()
    assert first == "task" and len(task_id) == 36
    assert streamed.stdout == client.job(task_id).result(timeout=30).text + "\n"  # text only
    waited = corral(
        redis_url, "submit", "chat", "llama3.2", "hello", "-o", "num_predict=4", "--wait"
    )
    assert waited.returncode == 0, waited.stderr
    assert waited.stderr.splitlines()[0] == f"task {json.loads(waited.stdout)['task_id']}"


def test_stream_shows_the_task_id_before_any_token(redis_url: str, client: Client) -> None:
    offer(client.redis, ["unserved-id-model"])  # on an Ollama host, but no worker serves it
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    argv = [
        sys.executable,
        "-m",
        "producers.cli",
        "submit",
        "generate",
        "unserved-id-model",
        "hi",
        "--stream",
    ]
    process = subprocess.Popen(
        argv, env=env, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert process.stderr is not None
    line = process.stderr.readline()  # nobody serves the model: no token can come first
    process.kill()
    process.wait(10)
    process.stderr.close()
    task_id = line.removeprefix("task ").strip()
    assert line.startswith("task ") and client.job(task_id).status() == "queued"
    client.job(task_id).cancel()


def test_a_prompt_at_the_limit_comes_through_stdin(redis_url: str, client: Client) -> None:
    model = "stdin-limit-model"
    announce_idle_worker(client.redis, model)  # released: nothing consumes it
    prompt = "a" * 199_999 + "z"  # 200,000 characters: CORRAL_MAX_PROMPT_CHARS
    with pytest.raises(OSError):  # the OS refuses an argument this long (128 KiB on Linux)
        corral(redis_url, "submit", "generate", model, prompt)
    run = corral(redis_url, "submit", "generate", model, "-", answer=prompt)
    assert run.returncode == 0, run.stderr
    assert queued_payload(client, model)["prompt"] == prompt
    over = corral(redis_url, "submit", "generate", model, "-", answer=prompt + "!")
    assert over.returncode == 2
    assert "prompt of 200,001 characters exceeds 200,000" in over.stderr
    assert client.redis.llen(queue_name(model)) == 1  # nothing more enqueued
    client.redis.delete(queue_name(model))


PayloadText = Callable[[dict[str, Any]], str]
KIND_TEXTS: dict[str, tuple[list[str], str, PayloadText]] = {
    # kind: (its other required options, its text's file option, where the text lands)
    "generate": ([], "--prompt-file", lambda p: p["prompt"]),
    "chat": ([], "--message-file", lambda p: p["messages"][-1]["content"]),
    "structured": (["--schema", '{"type": "object"}'], "--prompt-file", lambda p: p["prompt"]),
    "multimodal": (["--image", "IMAGE"], "--prompt-file", lambda p: p["prompt"]),
}


@pytest.mark.parametrize("kind", sorted(KIND_TEXTS))
def test_every_kind_reads_its_text_from_stdin_or_a_file(
    kind: str, redis_url: str, client: Client, tmp_path: Path
) -> None:
    from tests.test_contract import png

    image = tmp_path / "pic.png"
    image.write_bytes(png(8, 8))
    extra, file_option, text_of = KIND_TEXTS[kind]
    extra = [str(image) if arg == "IMAGE" else arg for arg in extra]
    model = f"text-source-{kind}"
    announce_idle_worker(client.redis, model)  # released: nothing consumes it
    runner, env = CliRunner(), {"CORRAL_REDIS_URL": redis_url}
    text = "Line one;\n  `$price` is $5.\n"  # kept exactly: no stripping, no edits
    run = runner.invoke(cli, ["submit", kind, model, "-", *extra], input=text, env=env)
    assert run.exit_code == 0, run.output
    assert text_of(queued_payload(client, model)) == text
    source = tmp_path / "text.txt"
    source.write_text("from a file ✓", encoding="utf-8")
    run = runner.invoke(cli, ["submit", kind, model, file_option, str(source), *extra], env=env)
    assert run.exit_code == 0, run.output
    assert text_of(queued_payload(client, model)) == "from a file ✓"
    run = runner.invoke(
        cli, ["submit", kind, model, "inline", file_option, str(source), *extra], env=env
    )
    assert run.exit_code == 2 and "not both" in run.stderr
    run = runner.invoke(cli, ["submit", kind, model, *extra], env=env)
    assert run.exit_code == 2 and file_option in run.stderr
    assert client.redis.llen(queue_name(model)) == 2  # the refused ones enqueued nothing
    client.redis.delete(queue_name(model))
    assert file_option in runner.invoke(cli, ["submit", kind, "--help"]).output


def test_a_missing_file_is_one_line_naming_the_option(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    model = "missing-file-model"
    missing = str(tmp_path / "nowhere.txt")
    cases = [
        (["generate", model, "--prompt-file", missing], "--prompt-file"),
        (["structured", model, "hi", "--schema", "book.schema.json"], "--schema"),
        (["generate", model, "hi", "--format", missing], "--format"),
        (["multimodal", model, "hi", "--image", missing], "--image"),
    ]
    for args, option in cases:
        run = corral(redis_url, "submit", *args)
        assert run.returncode == 2, run.stderr
        lines = error_lines(run)
        assert len(lines) == 1 and lines[0].startswith(f"error: {option}: "), run.stderr
        assert "does not exist" in lines[0] and "Expecting value" not in lines[0]
    assert client.redis.llen(queue_name(model)) == 0


def test_json_options_tell_bad_json_from_a_missing_file(
    redis_url: str, client: Client, tmp_path: Path
) -> None:
    model = "bad-json-model"
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": "object",}')
    cases = [
        (["structured", model, "hi", "--schema", '{"type": '], "--schema", "JSON text"),
        (["structured", model, "hi", "--schema", str(broken)], "--schema", str(broken)),
        (["generate", model, "hi", "--format", "[1, 2"], "--format", "JSON text"),
    ]
    for args, option, what in cases:
        run = corral(redis_url, "submit", *args)
        assert run.returncode == 2, run.stderr
        lines = error_lines(run)
        assert len(lines) == 1 and lines[0].startswith(f"error: {option}: "), run.stderr
        assert what in lines[0] and "is not valid JSON" in lines[0]
        assert "does not exist" not in lines[0]
    assert client.redis.llen(queue_name(model)) == 0


def test_a_second_cancel_reports_how_the_task_ended(
    redis_url: str, client: Client, sim: SimControl
) -> None:
    prompt = f"Go on and on. [{uuid.uuid4().hex}]"  # the stall is this request's alone
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "prompt_contains": prompt}]
    )
    job = client.generate("llama3.2", prompt)
    for event in job.stream(timeout=30):
        if event["type"] == "token":
            break  # generating, then stalled: the cancel reaches it through the lease heartbeat
    first = corral(redis_url, "cancel", job.id)
    assert first.stdout.strip() == f"{job.id}: cancel requested; the worker stops within one chunk"
    deadline = time.monotonic() + 30  # the worker stores its outcome after the event
    while client.backend.get_task_meta(job.id)["status"] != "FAILURE":
        assert time.monotonic() < deadline, "the worker never stored the outcome"
        time.sleep(0.05)
    second = corral(redis_url, "cancel", job.id)
    assert second.stdout.strip() == f"{job.id}: already cancelled; nothing to cancel"
    result = corral(redis_url, "result", job.id)
    assert result.returncode == 1 and "cancelled while calling Ollama" in result.stderr


def test_cancelling_a_queued_task_twice(redis_url: str, client: Client) -> None:
    offer(client.redis, ["cancel-twice-model"])  # on an Ollama host: admitted, and it waits
    job = client.generate("cancel-twice-model", "nobody serves me")
    first = corral(redis_url, "cancel", job.id)
    assert first.stdout.strip() == f"{job.id}: cancelled before it started; it will never run"
    second = corral(redis_url, "cancel", job.id)
    assert second.stdout.strip() == f"{job.id}: already cancelled; nothing to cancel"
    client.redis.delete("corral.cancel-twice-model:latest")


@pytest.mark.parametrize("command", ["result", "stream"])
def test_following_a_task_no_worker_serves_says_so(
    redis_url: str, client: Client, command: str
) -> None:
    offer(client.redis, ["lonely-follow-model"])  # on an Ollama host: admitted, and it waits
    job = client.generate("lonely-follow-model", "hi")
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    argv = [sys.executable, "-m", "producers.cli", command, job.id]
    process = subprocess.Popen(
        argv, env=env, text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    assert process.stderr is not None
    line = process.stderr.readline()  # after a short while, while it still waits
    if line.startswith("queued:"):  # `corral stream` says its place in line first
        line = process.stderr.readline()
    process.kill()
    process.wait(10)
    process.stderr.close()
    assert line.startswith(f"note: task {job.id}: no worker serves corral.lonely-follow-model")
    assert "corral worker --model lonely-follow-model:latest" in line
    job.cancel()
    client.redis.delete("corral.lonely-follow-model:latest")
