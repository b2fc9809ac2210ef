"""The Ollama facade, driven by the official ``ollama`` client pointed at the gateway."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import ollama
import pytest
import redis
import requests
from test_gateway_native import png_bytes
from test_gateway_support import gateway_url_fixture  # noqa: F401

from producers.client import Client
from tasks.keys import stream_channel
from tests.conftest import SimControl

TIMEOUT = (5, 30)


@pytest.fixture
def ollama_client(gateway_url: str) -> Iterator[ollama.Client]:
    with ollama.Client(host=gateway_url, timeout=30) as client:
        yield client


def test_generate_without_and_with_streaming(ollama_client: ollama.Client) -> None:
    whole = ollama_client.generate(
        model="llama3.2", prompt="Why is the sky blue?", options={"temperature": 0, "seed": 1}
    )
    assert whole.done and whole.done_reason == "stop" and whole.response
    assert whole.model == "llama3.2" and whole.eval_count and whole.total_duration

    chunks = list(
        ollama_client.generate(model="llama3.2", prompt="Why is the sky blue?", stream=True)
    )
    # Text that arrives within one Redis round trip shares an event, so with an undelayed
    # simulator the reply may come as a single text chunk; the final chunk carries no text.
    assert len(chunks) >= 2 and all(not c.done for c in chunks[:-1])
    assert chunks[-1].done and chunks[-1].done_reason == "stop" and chunks[-1].eval_count
    assert "".join(c.response for c in chunks[:-1]).strip()


def test_generate_context_round_trips(ollama_client: ollama.Client) -> None:
    first = ollama_client.generate(model="llama3.2", prompt="Remember the number 7.")
    assert first.context and all(isinstance(t, int) for t in first.context)
    chunks = list(
        ollama_client.generate(
            model="llama3.2", prompt="Which number?", context=first.context, stream=True
        )
    )
    assert chunks[-1].done and chunks[-1].context
    assert not any(c.context for c in chunks[:-1])
    raw = ollama_client.generate(model="llama3.2", prompt="x", raw=True)
    assert not raw.context  # as in Ollama: raw mode returns no context


def test_chat_without_and_with_streaming(ollama_client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Recommend a novel."}]
    whole = ollama_client.chat(model="llama3.2", messages=messages)
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    chunks = list(ollama_client.chat(model="llama3.2", messages=messages, stream=True))
    assert chunks[-1].done and chunks[-1].done_reason == "stop"
    assert "".join(c.message.content for c in chunks).strip()


def test_thinking_model_streams_thinking_first(ollama_client: ollama.Client) -> None:
    chunks = list(
        ollama_client.chat(
            model="deepseek-r1:14b",
            think=True,
            stream=True,
            messages=[{"role": "user", "content": "2+2?"}],
        )
    )
    thinking = "".join(c.message.thinking or "" for c in chunks)
    assert thinking and "".join(c.message.content for c in chunks)


def test_structured_format_keeps_ollamas_reply_shape(ollama_client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
    }
    reply = ollama_client.chat(
        model="llama3.2", format=schema, messages=[{"role": "user", "content": "A classic novel?"}]
    )
    data = json.loads(reply.message.content)
    assert isinstance(data["title"], str) and isinstance(data["year"], int)
    generated = ollama_client.generate(model="llama3.2", prompt="A novel?", format=schema)
    assert set(json.loads(generated.response)) >= {"title", "year"}


def test_images_through_generate_and_chat(ollama_client: ollama.Client) -> None:
    image = png_bytes("blue")
    answer = ollama_client.generate(model="llava:7b", prompt="What is this?", images=[image])
    assert answer.response and answer.done
    chat = ollama_client.chat(
        model="llava:7b", messages=[{"role": "user", "content": "Describe it.", "images": [image]}]
    )
    assert chat.message.content


def test_embed_list_ps_show_version(ollama_client: ollama.Client, gateway_url: str) -> None:
    vectors = ollama_client.embed(model="all-minilm", input=["one", "two"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 384
    names = [m.model for m in ollama_client.list().models]
    assert "llama3.2:latest" in names and len(names) == len(set(names))
    assert isinstance(ollama_client.ps().models, list)
    assert ollama_client.show("llama3.2").details.family == "llama"
    assert requests.get(f"{gateway_url}/api/version", timeout=TIMEOUT).json()["version"]


def test_unknown_model_is_ollamas_404(ollama_client: ollama.Client) -> None:
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as caught:
            reply = ollama_client.generate(model="ghost-model", prompt="hi", stream=stream)
            if stream:
                list(reply)
        assert caught.value.status_code == 404
        assert caught.value.error == "model 'ghost-model' not found"
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model="ghost-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404


def test_a_model_no_worker_serves_is_ollamas_404_at_once(
    ollama_client: ollama.Client, gateway_url: str, client: Client
) -> None:
    """The simulator has qwen2.5-coder:7b, but no worker serves it: its task would wait in
    silence, so the facade answers as Ollama does for a model it does not have."""
    quick = (5, 5)
    for path, body in (
        ("/api/generate", {"model": "qwen2.5-coder:7b", "prompt": "hi"}),
        ("/api/generate", {"model": "qwen2.5-coder:7b", "prompt": "hi", "stream": False}),
        (
            "/api/chat",
            {"model": "qwen2.5-coder:7b", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/api/generate", {"model": "no-such-model", "prompt": "hi"}),
    ):
        reply = requests.post(f"{gateway_url}{path}", json=body, timeout=quick)
        assert reply.status_code == 404, (path, body)
        assert reply.json() == {"error": f"model '{body['model']}' not found"}
    with pytest.raises(ollama.ResponseError) as caught:
        ollama_client.chat(model="qwen2.5-coder", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'qwen2.5-coder' not found"
    assert not client.redis.exists("corral.qwen2.5-coder:7b", "corral.no-such-model:latest")


def test_tags_lists_only_models_a_worker_serves(ollama_client: ollama.Client) -> None:
    names = {m.model for m in ollama_client.list().models}
    assert "llama3.2:latest" in names and "llava:7b" in names
    assert "qwen2.5-coder:7b" not in names  # on the Ollama host, but no worker serves it


def test_invalid_request_at_the_door_is_400(gateway_url: str) -> None:
    reply = requests.post(
        f"{gateway_url}/api/generate",
        timeout=TIMEOUT,
        json={"model": "llama3.2", "prompt": "x", "keep_alive": "300"},
    )
    assert reply.status_code == 400 and "keep_alive" in reply.json()["error"]
    assert requests.post(f"{gateway_url}/api/chat", json={}, timeout=TIMEOUT).json() == {
        "error": "model is required"
    }
    empty = requests.post(f"{gateway_url}/api/generate", data=b"", timeout=TIMEOUT)
    assert empty.status_code == 400 and empty.json() == {"error": "missing request body"}


def test_unknown_paths_and_methods_answer_as_ollama(gateway_url: str) -> None:
    unknown = requests.post(f"{gateway_url}/api/nope", json={}, timeout=TIMEOUT)
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    assert unknown.headers["content-type"].startswith("text/plain")
    wrong = requests.get(f"{gateway_url}/api/chat", timeout=TIMEOUT)
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")


def test_ndjson_chunks_have_ollamas_exact_shape(gateway_url: str) -> None:
    with requests.post(
        f"{gateway_url}/api/generate",
        stream=True,
        timeout=TIMEOUT,
        json={"model": "llama3.2", "prompt": "Hello"},
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        assert reply.headers["X-Corral-Task-Id"] and "X-Corral-Queue-Position" in reply.headers
        lines = [json.loads(raw) for raw in reply.iter_lines()]
    for chunk in lines[:-1]:
        assert set(chunk) == {"model", "created_at", "response", "done"}
        assert chunk["done"] is False and chunk["created_at"].endswith("Z")
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    assert all(final[k] for k in final if k.endswith(("_count", "_duration")))  # zeros omitted
    assert {"total_duration", "eval_count"} <= set(final)


def test_a_client_that_goes_away_cancels_its_task(
    gateway_url: str, sim: SimControl, client: Client
) -> None:
    prompt = f"Go on and on. [{uuid.uuid4().hex}]"  # the stall is this request's alone
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "prompt_contains": prompt}]
    )
    reply = requests.post(
        f"{gateway_url}/api/generate",
        stream=True,
        timeout=TIMEOUT,
        json={"model": "llama3.2", "prompt": prompt},
    )
    task_id = reply.headers["X-Corral-Task-Id"]
    first = json.loads(next(reply.iter_lines()))
    assert first["done"] is False
    reply.close()  # the client hangs up while the model is still generating
    events = list(client.job(task_id).stream(timeout=30))
    assert events[-1]["type"] == "cancelled"
    assert client.job(task_id).status() == "cancelled"


@pytest.mark.timeout(25)
def test_a_client_that_goes_away_before_the_first_byte_cancels_its_task(
    gateway_url: str, sim: SimControl, client: Client
) -> None:
    """The model is loading (30 s here) and no header has gone out yet when the client hangs
    up: the task is cancelled, and the connection to Ollama closed, within about a second."""
    sim.faults(first_byte_delay_seconds=30)
    since = sim.events()["next"]
    body = json.dumps({"model": "llama3.2", "prompt": "Wait with me."}).encode()
    request = b"POST /api/generate HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    host, port = gateway_url.removeprefix("http://").rsplit(":", 1)
    with client.redis.pubsub(ignore_subscribe_messages=True) as starts:
        starts.psubscribe(stream_channel("*"))
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            task_id = wait_for_start(starts)
            sim.wait_for_event("request", timeout_s=10, since=since, path="/api/generate")
            hung_up = time.time()
    events = list(client.job(task_id).stream(timeout=10))
    ended_s = time.time() - hung_up
    assert events[-1]["type"] == "cancelled"
    assert ended_s < 1.0, f"the task ended {ended_s:.3f} s after the client went away"
    disconnect = sim.wait_for_event("disconnect", timeout_s=5, since=since)
    assert disconnect["t"] - hung_up < 1.0


def wait_for_start(pubsub: redis.client.PubSub, timeout_s: float = 10) -> str:
    """The id of the next task whose ``start`` event is published."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and json.loads(message["data"])["type"] == "start":
            return str(json.loads(message["data"])["task_id"])
    raise TimeoutError("no task started")
