"""The ``embed`` kind end to end: SDK, CLI, ``/v1/tasks/embed`` and the facade's two routes,
with a real worker gathering tasks into shared ``/api/embed`` calls.

The module has its own simulator and its own worker of ``nomic-embed-text`` (batches of at most
``BATCH`` inputs), so that the simulator's ``embed`` events count this worker's calls alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest
import redis
import requests
from test_gateway_support import GatewayServer

from producers import Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from tasks.errors import InvalidRequest, TaskCancelled
from tasks.keys import queue_name, task_key
from tasks.kinds.embed import EmbedResult
from tasks.settings import Settings, load_settings
from tests.conftest import FAST_RETRIES
from tests.embed_support import MODEL, EmbedSim, outcomes, slow_first_call, wait_running

BATCH = 8  # CORRAL_EMBED_BATCH_MAX_INPUTS of this module's worker
WAIT_S = 60
CRASH_DB = 7  # the crash test's workers and tasks, apart from everything else


@pytest.fixture(scope="module")
def embed_sim() -> Iterator[EmbedSim]:
    """Simulated delays on (a load before the first call), so that tasks can gather."""
    child, url = start_simulator([])
    control = EmbedSim(url)
    control.configure(models={MODEL: {"load_s": 0.0, "first_token_s": 0.0}})
    yield control
    child.stop()


@pytest.fixture(scope="module")
def embed_worker(
    redis_url: str, embed_sim: EmbedSim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    log = Path(tmp_path_factory.mktemp("embed")) / "worker.log"
    env = {**FAST_RETRIES, "CORRAL_EMBED_BATCH_MAX_INPUTS": str(BATCH)}
    child = start_worker(
        [MODEL], redis_url=redis_url, ollama_host=embed_sim.url, slots=64, log_path=log, env=env
    )
    yield child
    child.stop()


@pytest.fixture
def sim(embed_sim: EmbedSim, embed_worker: Child) -> Iterator[EmbedSim]:
    embed_sim.reset()
    yield embed_sim
    embed_sim.configure(models={MODEL: {"load_s": 0.0, "first_token_s": 0.0}})
    embed_sim.reset()


def test_one_text_or_a_list_in_input_order(client: Client, sim: EmbedSim) -> None:
    texts = ["the quick brown fox", "jumps over", "the lazy dog", "again and again", "fin"]
    result = client.embed(MODEL, texts).result(timeout=WAIT_S)
    assert isinstance(result, EmbedResult)
    direct = sim.direct(texts)
    assert result.embeddings == direct["embeddings"]  # one vector per input, in order
    assert result.prompt_eval_count == direct["prompt_eval_count"]  # a call of its own: exact
    single = client.embed(MODEL, "the quick brown fox").result(timeout=WAIT_S)
    assert isinstance(single, EmbedResult) and single.embeddings == direct["embeddings"][:1]
    assert result.model == "nomic-embed-text:latest" and result.metrics.total_duration
    assert json.loads(result.model_dump_json())["prompt_eval_count"] == direct["prompt_eval_count"]


def test_an_embed_task_streams_start_then_done(client: Client, sim: EmbedSim) -> None:
    job = client.embed(MODEL, ["a", "b"])
    job.result(timeout=WAIT_S)
    events = list(job.stream(timeout=WAIT_S))
    assert [e["type"] for e in events] == ["start", "done"]
    assert events[0]["kind"] == "embed" and len(events[1]["result"]["embeddings"]) == 2


def test_a_list_larger_than_the_batch_is_split(client: Client, sim: EmbedSim) -> None:
    texts = [f"input number {i}" for i in range(2 * BATCH + 4)]
    mark = sim.mark()
    result = client.embed(MODEL, texts, dimensions=64).result(timeout=WAIT_S)
    assert [call["inputs"] for call in sim.embed_calls(mark)] == [BATCH, BATCH, 4]
    assert isinstance(result, EmbedResult)
    assert result.embeddings == sim.direct(texts, dimensions=64)["embeddings"]
    assert all(len(vector) == 64 for vector in result.embeddings)


def test_waiting_tasks_of_a_model_share_calls(client: Client, sim: EmbedSim) -> None:
    texts = [f"text {i}" for i in range(5 * BATCH)]
    slow_first_call(sim, load_s=2.0)
    mark = sim.mark()
    jobs = [client.embed(MODEL, text) for text in texts]
    results = [job.result(timeout=WAIT_S) for job in jobs]
    calls = [call["inputs"] for call in sim.embed_calls(mark)]
    # One call per task would be 40 calls; the tasks that arrived during the first call's load
    # went out together, BATCH inputs at a time.
    assert sum(calls) == len(texts) and max(calls) == BATCH and len(calls) <= 10, calls
    direct = sim.direct(texts)
    assert [r.embeddings[0] for r in results if isinstance(r, EmbedResult)] == direct["embeddings"]
    # Each task has its share of its call's tokens; the shares add up to the calls' counts.
    shares = [r.prompt_eval_count for r in results if isinstance(r, EmbedResult)]
    assert sum(s or 0 for s in shares) == direct["prompt_eval_count"]


def test_tasks_submitted_many_at_a_time_are_each_their_own(client: Client, sim: EmbedSim) -> None:
    """``submit_many`` and ``results``: one round trip per chunk, and still one task per input,
    each with its own id, result and events, gathered into shared calls by the worker."""
    texts = [f"many {i}" for i in range(3 * BATCH)]
    slow_first_call(sim, load_s=1.0)
    mark = sim.mark()
    jobs = client.submit_many("embed", [{"model": MODEL, "input": t} for t in texts], chunk=5)
    assert len({job.id for job in jobs}) == len(texts)
    results = client.results(jobs, timeout=WAIT_S)
    direct = sim.direct(texts)["embeddings"]
    assert [r.embeddings for r in results if isinstance(r, EmbedResult)] == [[v] for v in direct]
    assert [r.task_id for r in results] == [job.id for job in jobs]
    assert all([e["type"] for e in job.stream(timeout=WAIT_S)] == ["start", "done"] for job in jobs)
    assert len(sim.embed_calls(mark)) < len(texts)
    failing = client.embed(MODEL, " ".join(["word"] * 3000), truncate=False)
    with pytest.raises(InvalidRequest, match="exceeds the context length"):
        client.results([jobs[0], failing, jobs[1]], timeout=WAIT_S)  # the first error, in order


def test_an_input_that_fails_its_call_fails_only_its_own_task(
    client: Client, sim: EmbedSim
) -> None:
    too_long = " ".join(["word"] * 3000)  # over nomic-embed-text's 2048-token context
    slow_first_call(sim, load_s=1.0)
    jobs = [client.embed(MODEL, text, truncate=False) for text in ("one", too_long, "two")]
    first, failing, last = jobs
    assert isinstance(first.result(timeout=WAIT_S), EmbedResult)
    assert isinstance(last.result(timeout=WAIT_S), EmbedResult)
    with pytest.raises(InvalidRequest, match="exceeds the context length"):
        failing.result(timeout=WAIT_S)
    assert [e["type"] for e in failing.stream(timeout=WAIT_S)] == ["start", "error"]


def test_a_failed_call_is_retried_for_each_of_its_tasks(client: Client, sim: EmbedSim) -> None:
    sim.faults(fail_next=[{"type": "status", "status": 500, "model": MODEL}])
    result = client.embed(MODEL, ["retry me"]).result(timeout=WAIT_S)
    assert isinstance(result, EmbedResult) and result.attempts == 2
    assert result.embeddings == sim.direct(["retry me"])["embeddings"]


def test_a_task_cancelled_while_it_waits_for_its_call_ends_cancelled(
    client: Client, sim: EmbedSim
) -> None:
    slow_first_call(sim, load_s=5.0)
    job = client.embed(MODEL, "never mind")
    # Celery's STARTED comes before the worker holds the task; its `start` event comes after.
    events = job.stream(timeout=WAIT_S)
    while next(events)["type"] != "start":
        pass
    events.close()
    started = time.monotonic()
    job.cancel()
    with pytest.raises(TaskCancelled):
        job.result(timeout=WAIT_S)
    assert time.monotonic() - started < 3.0  # did not wait for the 5 s call
    assert [e["type"] for e in job.stream(timeout=WAIT_S)] == ["start", "cancelled"]


def test_generation_options_are_refused_and_nothing_is_queued(
    client: Client, settings: Settings
) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    before = (r.llen(queue_name(MODEL)), len(list(r.scan_iter(task_key("*"), count=1000))))
    with pytest.raises(InvalidRequest) as caught:
        client.embed(MODEL, "x", options={"temperature": 0.2})
    assert caught.value.field == "options.temperature"
    assert "embedding models take no generation options" in caught.value.message
    for bad, field in (([], "input"), (["ok", " "], "input.1"), (["x"] * 10_001, "input")):
        with pytest.raises(InvalidRequest) as caught:
            client.embed(MODEL, bad)
        assert caught.value.field == field
    after = (r.llen(queue_name(MODEL)), len(list(r.scan_iter(task_key("*"), count=1000))))
    assert after == before  # nothing recorded, nothing queued


def test_runner_options_are_taken(client: Client, sim: EmbedSim) -> None:
    result = client.embed(MODEL, "x", options={"num_ctx": 1024}, keep_alive="1m")
    assert isinstance(result.result(timeout=WAIT_S), EmbedResult)


def test_cli_submit_embed_with_a_file(redis_url: str, sim: EmbedSim, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("from the file\n\nsecond line\n", encoding="utf-8")
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "producers.cli",
            "submit",
            "embed",
            MODEL,
            "first",
            "second",
            "--file",
            str(inputs),
            "--wait",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    texts = ["first", "second", "from the file", "second line"]  # blank lines are not inputs
    assert result["kind"] == "embed" and result["embeddings"] == sim.direct(texts)["embeddings"]
    piped = subprocess.run(
        [sys.executable, "-m", "producers.cli", "submit", "embed", MODEL, "--file", "-", "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        input="from stdin\n",
    )
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["embeddings"] == sim.direct(["from stdin"])["embeddings"]
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "producers.cli",
            "submit",
            "embed",
            MODEL,
            "x",
            "-o",
            "temperature=0.5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert refused.returncode == 2 and "options.temperature" in refused.stderr


def test_v1_tasks_embed(client: Client, settings: Settings, sim: EmbedSim) -> None:
    with GatewayServer(settings) as server:
        reply = requests.post(
            f"{server.url}/v1/tasks/embed",
            timeout=WAIT_S,
            json={"model": MODEL, "input": ["over", "http"]},
        )
        assert reply.status_code == 202, reply.text
        outcome = client.job(reply.json()["id"]).result(timeout=WAIT_S)
        refused = requests.post(
            f"{server.url}/v1/tasks/embed",
            timeout=WAIT_S,
            json={"model": MODEL, "input": "x", "options": {"top_k": 3}},
        )
    assert isinstance(outcome, EmbedResult)
    assert outcome.embeddings == sim.direct(["over", "http"])["embeddings"]
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "options.top_k"


@pytest.fixture(scope="module")
def gateway(settings: Settings, embed_worker: Child) -> Iterator[str]:
    with GatewayServer(settings) as server:
        yield server.url


def test_facade_embed_with_the_official_client(gateway: str, sim: EmbedSim) -> None:
    with ollama.Client(host=gateway, timeout=WAIT_S) as api:
        many = api.embed(model=MODEL, input=["one", "two", "three"])
        one = api.embed(model=MODEL, input="one", options={"temperature": 0})  # ignored
        legacy = api.embeddings(model=MODEL, prompt="one")
    direct = sim.direct(["one", "two", "three"])
    assert many.embeddings == direct["embeddings"] and many.model == MODEL
    assert many.prompt_eval_count == direct["prompt_eval_count"]
    assert one.embeddings == direct["embeddings"][:1]
    assert list(legacy.embedding) == direct["embeddings"][0]


def test_facade_replies_have_ollamas_exact_shapes(gateway: str, sim: EmbedSim) -> None:
    embed = requests.post(f"{gateway}/api/embed", json={"model": MODEL, "input": "a"}, timeout=30)
    assert embed.status_code == 200 and embed.headers["X-Corral-Task-Id"]
    assert set(embed.json()) == {
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    }
    legacy = requests.post(
        f"{gateway}/api/embeddings", json={"model": MODEL, "prompt": "a"}, timeout=30
    )
    assert legacy.status_code == 200 and set(legacy.json()) == {"embedding"}
    mark = sim.mark()
    load = requests.post(f"{gateway}/api/embed", json={"model": MODEL}, timeout=30)
    assert load.json() == {"model": MODEL, "embeddings": []}  # no input: only loads the model
    assert "X-Corral-Task-Id" not in load.headers and not sim.embed_calls(mark)
    bad = requests.post(f"{gateway}/api/embed", json={"model": MODEL, "input": [1]}, timeout=30)
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid input type"})
    for path, body in (("embed", {"input": "a"}), ("embeddings", {"prompt": "a"})):
        body = {"model": "unserved", **body}
        unserved = requests.post(f"{gateway}/api/{path}", json=body, timeout=30)
        assert unserved.status_code == 404
        assert unserved.json() == {"error": "model 'unserved' not found"}


def test_tasks_held_by_a_killed_worker_are_each_embedded_once_by_another(
    redis_server: Any, embed_sim: EmbedSim, tmp_path: Path
) -> None:
    """A worker that holds many gathered tasks dies while their call is in flight: every task
    comes back after the visibility timeout, and ends with one ``done`` from the other worker."""
    url = f"redis://{redis_server.host}:{redis_server.port}/{CRASH_DB}"
    redis.Redis.from_url(url).flushdb()
    short = {"CORRAL_VISIBILITY_TIMEOUT_S": "3", "CORRAL_LEASE_TTL_S": "1.5"}
    env = {**FAST_RETRIES, **short, "CORRAL_EMBED_BATCH_MAX_INPUTS": str(BATCH)}
    texts = [f"held {i}" for i in range(12)]
    slow_first_call(embed_sim, load_s=4.0)

    def worker(name: str) -> Child:
        log, node = tmp_path / f"{name}.log", f"{name}@embed"
        return start_worker(
            [MODEL],
            redis_url=url,
            ollama_host=embed_sim.url,
            slots=32,
            name=node,
            log_path=log,
            env=env,
        )

    victim = worker("victim")
    rescuer = None
    try:
        with Client(settings=load_settings(redis_url=url)) as client:
            jobs = [client.embed(MODEL, text) for text in texts]
            wait_running(jobs, WAIT_S)
            victim.kill()  # its first call still loads the model; the others wait for it
            rescuer = worker("rescuer")
            results, streams = outcomes(jobs, WAIT_S)
    finally:
        victim.stop()
        if rescuer is not None:
            rescuer.stop()
        embed_sim.configure(models={MODEL: {"load_s": 0.0}})
        redis.Redis.from_url(url).flushdb()
    direct = embed_sim.direct(texts)["embeddings"]
    assert [r.embeddings[0] for r in results if isinstance(r, EmbedResult)] == direct
    assert all(r.worker == "rescuer@embed" for r in results)
    assert all(kinds == ["start", "start", "done"] for kinds in streams), streams
