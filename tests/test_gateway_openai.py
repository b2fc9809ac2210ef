"""The OpenAI-compatible routes, driven by the official ``openai`` client pointed at the gateway."""

from __future__ import annotations

import base64
import json
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import requests
from test_gateway_facade import wait_for_start
from test_gateway_native import png_bytes
from test_gateway_support import (
    GatewayServer,
    gateway_url_fixture,  # noqa: F401
    settings_on_db,
)

from producers.cli.local_stack import start_worker
from producers.client import Client
from producers.gateway.auth import create_key
from producers.gateway.openai_api import USER_FIELD
from tasks.keys import stream_channel, task_key
from tasks.settings import Settings
from tests.conftest import FAST_RETRIES, SimControl

TIMEOUT = (5, 30)
DB = 13
USER = [{"role": "user", "content": "Recommend a novel."}]
EMBEDDER = "all-minilm"  # an embedding model the session's worker serves


@pytest.fixture
def oai(gateway_url: str) -> Iterator[openai.OpenAI]:
    # The SDK wants a key; a gateway without keys ignores it. No retries: errors show at once.
    with openai.OpenAI(
        base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as client:
        yield client


def test_chat_not_streamed(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="llama3.2", messages=USER, temperature=0, seed=1)
    assert reply.object == "chat.completion" and reply.model == "llama3.2"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "stop" and reply.id.startswith("chatcmpl-")
    usage = reply.usage
    assert usage and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streamed_with_usage(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="llama3.2", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage and last.usage.completion_tokens > 0
    plain = list(oai.chat.completions.create(model="llama3.2", messages=USER, stream=True))
    assert plain[-1].choices and all(c.usage is None for c in plain)


def test_max_tokens_ends_with_length(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="llama3.2", messages=USER, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage and reply.usage.completion_tokens <= 3
    chunks = list(
        oai.chat.completions.create(
            model="llama3.2", messages=USER, stream=True, max_completion_tokens=3
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_thinking_streams_as_reasoning_content(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="deepseek-r1:14b",
            stream=True,
            reasoning_effort="medium",
            messages=[{"role": "user", "content": "2+2?"}],
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thinking = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert thinking and "".join(d.content or "" for d in deltas)
    first_thought = next(i for i, d in enumerate(deltas) if getattr(d, "reasoning_content", None))
    assert first_thought < next(i for i, d in enumerate(deltas) if d.content)
    whole = oai.chat.completions.create(
        model="deepseek-r1:14b",
        reasoning_effort="medium",
        messages=[{"role": "user", "content": "2+2?"}],
    )
    message = whole.choices[0].message
    assert getattr(message, "reasoning_content", None) and message.content
    plain = oai.chat.completions.create(
        model="deepseek-r1:14b",
        reasoning_effort="none",
        messages=[{"role": "user", "content": "2+2?"}],
    )
    assert not getattr(plain.choices[0].message, "reasoning_content", None)


def test_json_schema_response_format(oai: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "novel", "schema": schema}}
    reply = oai.chat.completions.create(
        model="llama3.2", messages=USER, response_format=response_format
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data["title"], str) and isinstance(data["year"], int)
    chunks = list(
        oai.chat.completions.create(
            model="llama3.2", messages=USER, stream=True, response_format=response_format
        )
    )
    streamed = json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert set(streamed) >= {"title", "year"} and chunks[-1].choices[0].finish_reason == "stop"
    loose = oai.chat.completions.create(
        model="llama3.2", messages=USER, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(loose.choices[0].message.content or ""), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "Call get_weather for Paris, please."}]


def test_tools_come_back_as_tool_calls(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="llama3.2", messages=ASK_WEATHER, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)

    chunks = list(
        oai.chat.completions.create(
            model="llama3.2", messages=ASK_WEATHER, tools=[WEATHER], stream=True
        )
    )
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert calls and calls[0].function and calls[0].function.name == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the conversation goes on with the tool's answer, named by the call's id
    follow_up = oai.chat.completions.create(
        model="llama3.2",
        tools=[WEATHER],
        messages=[
            *ASK_WEATHER,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 °C"},
        ],
    )
    assert follow_up.choices[0].message.content
    unused = oai.chat.completions.create(
        model="llama3.2", messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none"
    )
    assert unused.choices[0].finish_reason == "stop" and not unused.choices[0].message.tool_calls


def test_image_as_a_data_uri(oai: openai.OpenAI) -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes("blue")).decode()
    reply = oai.chat.completions.create(
        model="llava:7b",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": uri}},
                ],
            }
        ],
    )
    assert reply.choices[0].message.content and reply.usage
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model="llava:7b",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    ],
                }
            ],
        )
    assert caught.value.param == "messages[0].content[0].image_url.url"
    assert "data URI" in caught.value.message


def test_legacy_completions(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model="llama3.2", prompt="Why is the sky blue?", seed=1)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.choices[0].finish_reason == "stop" and whole.usage and whole.usage.total_tokens
    chunks = list(
        oai.completions.create(
            model="llama3.2",
            prompt="Why is the sky blue?",
            stream=True,
            max_tokens=5,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage


def test_models_list_and_retrieve(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "llama3.2:latest" in ids and "llava:7b" in ids and len(ids) == len(set(ids))
    one = oai.models.retrieve("llama3.2")
    assert one.id == "llama3.2:latest" and one.object == "model" and one.created > 0
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nobody-serves-this")


def test_request_id_header_is_the_task_id(oai: openai.OpenAI, settings: Settings) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="llama3.2", messages=USER, user="alice"
    )
    task_id = raw.headers["x-request-id"]
    assert raw.parse().id == f"chatcmpl-{task_id}"
    record = redis.Redis.from_url(settings.redis_url).hgetall(task_key(task_id))
    assert record[USER_FIELD.encode()] == b"alice"
    assert record[b"tenant"] == b"alice"  # a gateway without keys: the user is the tenant
    listed = oai.models.with_raw_response.list()
    assert listed.headers["x-request-id"]


def test_unknown_model_is_404_at_once(oai: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            oai.chat.completions.create(model="nobody-serves-this", messages=USER, stream=stream)
        assert caught.value.code == "model_not_found"
        assert caught.value.response.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nobody-serves-this", prompt="hi")


def test_bad_input_is_400_naming_the_param(oai: openai.OpenAI, gateway_url: str) -> None:
    chat, legacy = oai.chat.completions.create, oai.completions.create
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
    cases = [
        ("temperature", lambda: chat(model="llama3.2", messages=USER, temperature=7)),
        ("messages", lambda: chat(model="llama3.2", messages=[])),
        ("n", lambda: chat(model="llama3.2", messages=USER, n=2)),
        (
            "messages[0].content[0]",
            lambda: chat(model="llama3.2", messages=[{"role": "user", "content": [audio]}]),
        ),
        (
            "response_format",
            lambda: chat(model="llama3.2", messages=USER, response_format=bad_schema),
        ),
        (
            "tool_choice",
            lambda: chat(
                model="llama3.2",
                messages=USER,
                tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "nope"}},
            ),
        ),
        ("model", lambda: chat(model="Not A Model!", messages=USER)),
        ("suffix", lambda: legacy(model="llama3.2", prompt="def f(", suffix="return 1")),
        ("prompt", lambda: legacy(model="llama3.2", prompt=["one", "two"])),
    ]
    for param, call in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert caught.value.param == param, (param, caught.value.message)
        assert caught.value.type == "invalid_request_error"
    not_json = requests.post(f"{gateway_url}/v1/chat/completions", data=b"{", timeout=TIMEOUT)
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
    deep = requests.post(f"{gateway_url}/v1/chat/completions", data=b"[" * 100_000, timeout=TIMEOUT)
    assert deep.status_code == 400 and deep.json()["error"]["param"] == "body"
    nested: dict = {}
    for _ in range(300):  # parses, but nests beyond CORRAL_MAX_JSON_DEPTH
        nested = {"type": "object", "properties": {"a": nested}}
    schema = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested}}
    with pytest.raises(openai.BadRequestError) as caught:
        chat(model="llama3.2", messages=USER, response_format=schema)
    assert caught.value.param == "body" and "deep" in caught.value.message


def direct_embeddings(sim_url: str, texts: list[str], **extra: object) -> list[list[float]]:
    """What the simulator itself answers for these texts."""
    body = {"model": EMBEDDER, "input": texts, **extra}
    reply = requests.post(f"{sim_url}/api/embed", json=body, timeout=TIMEOUT)
    vectors: list[list[float]] = reply.json()["embeddings"]
    return vectors


def test_embeddings_single_and_list(oai: openai.OpenAI, sim_url: str) -> None:
    one = oai.embeddings.create(model=EMBEDDER, input="a red fox")  # the SDK asks for base64
    direct = direct_embeddings(sim_url, ["a red fox", "a lazy dog"])
    assert one.object == "list" and one.model == EMBEDDER and len(one.data) == 1
    assert one.data[0].object == "embedding" and one.data[0].index == 0
    assert one.data[0].embedding == pytest.approx(direct[0], rel=1e-6)  # float32 on the wire
    assert one.usage.prompt_tokens > 0 and one.usage.total_tokens == one.usage.prompt_tokens
    many = oai.embeddings.create(
        model=EMBEDDER, input=["a red fox", "a lazy dog"], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    assert [d.embedding for d in many.data] == direct  # exact: no float32 on the way


def test_embeddings_encodings_and_request_id(oai: openai.OpenAI, settings: Settings) -> None:
    raw = oai.embeddings.with_raw_response.create(
        model=EMBEDDER, input="x", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    vector = struct.unpack(f"<{len(base64.b64decode(encoded)) // 4}f", base64.b64decode(encoded))
    plain = oai.embeddings.create(model=EMBEDDER, input="x", encoding_format="float")
    assert list(vector) == pytest.approx(plain.data[0].embedding, rel=1e-6)
    record = redis.Redis.from_url(settings.redis_url).hgetall(task_key(raw.headers["x-request-id"]))
    assert record[b"kind"] == b"embed"


def test_embeddings_dimensions(oai: openai.OpenAI, sim_url: str) -> None:
    short = oai.embeddings.create(model=EMBEDDER, input=["a", "b"], dimensions=8)
    assert [len(d.embedding) for d in short.data] == [8, 8]
    direct = direct_embeddings(sim_url, ["a", "b"], dimensions=8)
    for got, want in zip(short.data, direct, strict=True):
        assert got.embedding == pytest.approx(want, rel=1e-6)


def test_embeddings_refusals(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.embeddings.create(model="nobody-serves-this", input="hi")
    assert caught.value.code == "model_not_found"
    cases = [
        ("input", "token arrays", [[1, 2, 3]]),
        ("input", "token arrays", [5, 6]),
        ("input", "at least one text", []),
        ("input[0]", "empty", [""]),
        ("dimensions", "greater than", 0),
    ]
    for param, told, wrong in cases:
        extra = {"dimensions": wrong} if param == "dimensions" else {}
        given = wrong if param.startswith("input") else "hi"
        with pytest.raises(openai.BadRequestError) as refused:
            oai.embeddings.create(model=EMBEDDER, input=given, **extra)  # type: ignore[arg-type]
        assert refused.value.param == param, refused.value.message
        assert told in refused.value.message, refused.value.message


def test_unknown_paths_answer_in_openais_shape(oai: openai.OpenAI, gateway_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        oai.post("/no/such/route", cast_to=object, body={})
    assert "/v1/no/such/route" in caught.value.message
    assert caught.value.response.headers["x-request-id"]
    body = caught.value.response.json()
    assert set(body) == {"error"} and body["error"]["type"] == "invalid_request_error"
    wrong = requests.get(f"{gateway_url}/v1/embeddings", timeout=TIMEOUT)
    assert wrong.status_code == 405 and wrong.json()["error"]["message"].startswith("Method")
    native = requests.get(f"{gateway_url}/v1/tasks/no-such-task", timeout=TIMEOUT)
    assert native.status_code == 404 and "detail" not in native.json()


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[Settings, redis.Redis]]:
    isolated = settings_on_db(settings.redis_url, DB)
    client = redis.Redis.from_url(isolated.redis_url)
    client.flushdb()
    yield isolated, client
    client.flushdb()
    client.close()


def test_keys_as_bearer_tokens(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, client = keyed
    token, _ = create_key(client, "sdk", models=["llama3.2"], rate_per_minute=3)
    with GatewayServer(settings) as server:
        base = f"{server.url}/v1"
        for wrong in ("crl_bad_key", "sk-not-a-corral-key"):
            with openai.OpenAI(base_url=base, api_key=wrong, max_retries=0) as bad:
                with pytest.raises(openai.AuthenticationError) as caught:
                    bad.models.list()
                assert (
                    caught.value.status_code == 401 and caught.value.type == "authentication_error"
                )
        with openai.OpenAI(base_url=base, api_key=token, max_retries=0) as good:
            assert [m.id for m in good.models.list()] == []  # no worker on this database
            with pytest.raises(openai.PermissionDeniedError):
                good.chat.completions.create(model="llava:7b", messages=USER)
            with pytest.raises(openai.NotFoundError):
                good.chat.completions.create(model="llama3.2", messages=USER)
            with pytest.raises(openai.RateLimitError) as limited:
                good.models.list()
            assert int(limited.value.response.headers["Retry-After"]) >= 1
            assert limited.value.type == "rate_limit_error"


def test_user_names_a_sub_tenant_only_where_the_key_allows_it(
    keyed: tuple[Settings, redis.Redis], sim_url: str, tmp_path: Path
) -> None:
    settings, client = keyed
    worker = start_worker(
        ["llama3.2", EMBEDDER],
        redis_url=settings.redis_url,
        ollama_host=sim_url,
        slots=2,
        log_path=tmp_path / "worker.log",
        env=FAST_RETRIES,
    )
    fixed_token, fixed = create_key(client, "fixed")
    shared_token, shared = create_key(client, "shared", user_tenants=True)
    try:
        with GatewayServer(settings) as server:
            base = f"{server.url}/v1"

            def tenant_of(raw: Any) -> bytes:
                return client.hget(task_key(raw.headers["x-request-id"]), "tenant") or b""

            with openai.OpenAI(base_url=base, api_key=fixed_token, max_retries=0) as oai:
                raw = oai.chat.completions.with_raw_response.create(
                    model="llama3.2", messages=USER, max_tokens=3, user="alice"
                )
                assert tenant_of(raw) == fixed.id.encode()  # the key is the tenant
                record = client.hgetall(task_key(raw.headers["x-request-id"]))
                assert record[USER_FIELD.encode()] == b"alice"  # still recorded
            with openai.OpenAI(base_url=base, api_key=shared_token, max_retries=0) as oai:
                chat = oai.chat.completions.with_raw_response.create(
                    model="llama3.2", messages=USER, max_tokens=3, user="alice"
                )
                text = oai.completions.with_raw_response.create(
                    model="llama3.2", prompt="Hi", max_tokens=3, user="bob@example.com"
                )
                vectors = oai.embeddings.with_raw_response.create(
                    model=EMBEDDER, input="hello", user="carol"
                )
                anonymous = oai.chat.completions.with_raw_response.create(
                    model="llama3.2", messages=USER, max_tokens=3
                )
                assert tenant_of(chat) == f"{shared.id}/alice".encode()
                assert tenant_of(text) == f"{shared.id}/bob@example.com".encode()
                assert tenant_of(vectors) == f"{shared.id}/carol".encode()
                assert tenant_of(anonymous) == shared.id.encode()
                with pytest.raises(openai.BadRequestError) as caught:
                    oai.chat.completions.create(model="llama3.2", messages=USER, user="Ann Lee")
                assert caught.value.param == "user" and "tenant" in caught.value.message
    finally:
        worker.stop()


def test_a_streaming_client_that_goes_away_cancels_its_task(
    gateway_url: str, sim: SimControl, client: Client
) -> None:
    prompt = f"Go on and on. [{uuid.uuid4().hex}]"  # the stall is this request's alone
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "prompt_contains": prompt}]
    )
    reply = requests.post(
        f"{gateway_url}/v1/chat/completions",
        stream=True,
        timeout=TIMEOUT,
        json={
            "model": "llama3.2",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        },
    )
    task_id = reply.headers["x-request-id"]
    assert reply.headers["content-type"].startswith("text/event-stream")
    first = next(line for line in reply.iter_lines() if line)
    assert json.loads(first.removeprefix(b"data: "))["id"] == f"chatcmpl-{task_id}"
    reply.close()  # the client hangs up while the model is still generating
    events = list(client.job(task_id).stream(timeout=30))
    assert events[-1]["type"] == "cancelled"


@pytest.mark.timeout(25)
def test_a_waiting_client_that_goes_away_cancels_its_task(
    gateway_url: str, sim: SimControl, client: Client
) -> None:
    """Not streamed: nothing is sent before the whole reply, yet a hang-up is noticed at once."""
    sim.faults(first_byte_delay_seconds=30)
    body = json.dumps({"model": "llama3.2", "messages": USER}).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
    request += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    host, port = gateway_url.removeprefix("http://").rsplit(":", 1)
    with client.redis.pubsub(ignore_subscribe_messages=True) as starts:
        starts.psubscribe(stream_channel("*"))
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(request)
            task_id = wait_for_start(starts)
            hung_up = time.time()
    events = list(client.job(task_id).stream(timeout=10))
    assert events[-1]["type"] == "cancelled"
    assert time.time() - hung_up < 2.0


def test_a_failure_in_the_task_keeps_its_class(oai: openai.OpenAI, sim: SimControl) -> None:
    # ghost-model has a worker but Ollama does not know it: the task fails, before any token
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            oai.chat.completions.create(model="ghost-model", messages=USER, stream=stream)
        assert caught.value.response.headers["x-request-id"]
    # after the first tokens, the stream ends with an error event: the SDK raises APIError
    sim.faults(fail_next=[{"type": "crash_after", "tokens": 3, "model": "llama3.2"}])
    chunks = []
    with pytest.raises(openai.APIError) as failed:
        for chunk in oai.chat.completions.create(model="llama3.2", messages=USER, stream=True):
            chunks.append(chunk)
    assert chunks and "send the request again" in failed.value.message


def test_sse_chunks_have_openais_exact_shape(gateway_url: str) -> None:
    body = {
        "model": "llama3.2",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with requests.post(
        f"{gateway_url}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-request-id"] == reply.headers["X-Corral-Task-Id"]
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith(b"data: ") for line in lines) and lines[-1] == b"data: [DONE]"
    chunks = [json.loads(line.removeprefix(b"data: ")) for line in lines[:-1]]
    for chunk in chunks[:-1]:
        assert set(chunk) == {"id", "object", "created", "model", "choices", "usage"}
        assert chunk["usage"] is None and len(chunk["choices"]) == 1
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["total_tokens"] == (
        usage["prompt_tokens"] + usage["completion_tokens"]
    )
