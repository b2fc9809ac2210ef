"""The official ``ollama`` client against the simulator, endpoint by endpoint."""

from __future__ import annotations

import json
import math

import jsonschema
import ollama
import pytest
from pydantic import BaseModel
from sim_support import WEATHER_TOOL, image_bytes


@pytest.mark.parametrize("stream", [False, True])
def test_generate_returns_text_and_metrics(client: ollama.Client, stream: bool) -> None:
    if stream:
        parts = list(client.generate(model="llama3.2", prompt="Describe a queue", stream=True))
        text = "".join(p.response for p in parts)
        final = parts[-1]
        assert all(not p.done for p in parts[:-1]) and final.done
        assert final.response == ""
    else:
        final = client.generate(model="llama3.2", prompt="Describe a queue")
        text = final.response
    assert final.done_reason == "stop"
    assert 20 <= final.eval_count <= 120
    assert text[0].isupper() and text.rstrip()[-1] in ".!"
    assert len(text.split()) >= 10
    assert final.context and len(final.context) > final.eval_count
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(final, name), int) and getattr(final, name) > 0
    assert final.total_duration >= final.load_duration
    assert final.model == "llama3.2"


@pytest.mark.parametrize("chat", [False, True])
def test_logprobs_per_token_with_top_alternatives(client: ollama.Client, chat: bool) -> None:
    def call(stream: bool):  # noqa: ANN202
        asked = {"logprobs": True, "top_logprobs": 3, "options": {"num_predict": 5}}
        if chat:
            messages = [{"role": "user", "content": "Hi"}]
            return client.chat(model="llama3.2", messages=messages, stream=stream, **asked)
        return client.generate(model="llama3.2", prompt="Hi", stream=stream, **asked)

    parts = list(call(stream=True))
    streamed = [lp for p in parts[:-1] for lp in p.logprobs or []]
    assert len(streamed) == 5 and parts[-1].logprobs is None
    for entry in streamed:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
    whole = call(stream=False)
    assert [e.model_dump() for e in whole.logprobs] == [e.model_dump() for e in streamed]
    plain = client.generate(model="llama3.2", prompt="Hi", options={"num_predict": 2})
    assert plain.logprobs is None  # only when asked for


def test_generate_is_deterministic_and_depends_on_seed(client: ollama.Client) -> None:
    first = client.generate(model="llama3.2", prompt="Same words", options={"seed": 7})
    again = client.generate(model="llama3.2", prompt="Same words", options={"seed": 7})
    other = client.generate(model="llama3.2", prompt="Same words", options={"seed": 8})
    assert first.response == again.response
    assert first.response != other.response


def test_stream_and_non_stream_give_the_same_text(client: ollama.Client) -> None:
    whole = client.generate(model="llama3.2", prompt="tokens please").response
    parts = client.generate(model="llama3.2", prompt="tokens please", stream=True)
    assert "".join(p.response for p in parts) == whole


def test_num_predict_gives_length(client: ollama.Client) -> None:
    result = client.generate(model="llama3.2", prompt="long", options={"num_predict": 7})
    assert result.done_reason == "length"
    assert result.eval_count == 7


def test_stop_sequence_cuts_the_reply(client: ollama.Client) -> None:
    full = client.generate(model="llama3.2", prompt="stops").response
    cut = client.generate(model="llama3.2", prompt="stops", options={"stop": ["."]})
    assert cut.done_reason == "stop"
    assert "." not in cut.response
    assert full.startswith(cut.response)


def test_raw_generate_has_no_context(client: ollama.Client) -> None:
    result = client.generate(model="llama3.2", prompt="raw text", raw=True)
    assert result.context is None


@pytest.mark.parametrize("stream", [False, True])
def test_chat(client: ollama.Client, stream: bool) -> None:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    if stream:
        parts = list(client.chat(model="llama3.2", messages=messages, stream=True))
        content = "".join(p.message.content for p in parts)
        final = parts[-1]
        assert final.message.content == "" and final.message.role == "assistant"
    else:
        final = client.chat(model="llama3.2", messages=messages)
        content = final.message.content
    assert final.done and final.done_reason == "stop"
    assert len(content.split()) >= 10
    assert final.eval_count > 0 and final.prompt_eval_count > 0


def test_chat_with_thinking_streams_thinking_first(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "Plan a trip"}]
    parts = list(client.chat(model="deepseek-r1:14b", messages=messages, stream=True, think=True))
    kinds = ["thinking" if p.message.thinking else "content" for p in parts if not p.done]
    assert kinds[0] == "thinking" and kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda k: k != "thinking")
    assert all(p.message.content == "" for p in parts if p.message.thinking)
    whole = client.chat(model="deepseek-r1:14b", messages=messages, think=True)
    assert whole.message.thinking == "".join(p.message.thinking or "" for p in parts)
    assert whole.message.content == "".join(p.message.content for p in parts)


def test_thinking_models_think_by_default_and_can_stop(client: ollama.Client) -> None:
    default = client.generate(model="deepseek-r1:14b", prompt="hello")
    off = client.generate(model="deepseek-r1:14b", prompt="hello", think=False)
    assert default.thinking and default.response
    assert off.thinking is None and off.response


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_tools_calls_the_named_tool(client: ollama.Client, stream: bool) -> None:
    messages = [{"role": "user", "content": "Use get_weather for Tokyo please"}]
    if stream:
        parts = list(
            client.chat(model="llama3.2", messages=messages, tools=[WEATHER_TOOL], stream=True)
        )
        calls = [c for p in parts for c in (p.message.tool_calls or [])]
        final = parts[-1]
    else:
        final = client.chat(model="llama3.2", messages=messages, tools=[WEATHER_TOOL])
        calls = final.message.tool_calls or []
    assert final.done_reason == "stop"
    assert len(calls) == 1
    call = calls[0]
    assert call.function.name == "get_weather"
    assert call.function.arguments["city"] == "Tokyo"
    jsonschema.validate(dict(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_tool_call_ids_look_like_ollama(http, sim) -> None:
    body = {
        "model": "llama3.2",
        "stream": False,
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "get_weather in Oslo"}],
    }
    call = http.post(f"{sim.url}/api/chat", json=body).json()["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and len(call["id"]) == 13
    assert call["function"]["index"] == 0


def test_chat_after_a_tool_result_answers_in_text(client: ollama.Client) -> None:
    messages = [
        {"role": "user", "content": "get_weather for Tokyo"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}],
        },
        {"role": "tool", "content": "22 degrees", "tool_name": "get_weather"},
    ]
    result = client.chat(model="llama3.2", messages=messages, tools=[WEATHER_TOOL])
    assert not result.message.tool_calls and result.message.content


@pytest.mark.parametrize(
    ("fmt", "width", "height", "name"),
    [
        ("PNG", 64, 48, "PNG"),
        ("JPEG", 120, 80, "JPEG"),
        ("GIF", 10, 20, "GIF"),
        ("WEBP", 33, 17, "WebP"),
    ],
)
def test_vision_describes_the_image(
    client: ollama.Client, fmt: str, width: int, height: int, name: str
) -> None:
    image = image_bytes(width, height, fmt)
    result = client.generate(model="llava:7b", prompt="What is this?", images=[image])
    assert f"{width}x{height} {name}" in result.response
    chat = client.chat(
        model="llava:7b", messages=[{"role": "user", "content": "Describe", "images": [image]}]
    )
    assert f"{width}x{height} {name}" in chat.message.content


def test_format_json_is_valid_json(client: ollama.Client) -> None:
    result = client.generate(model="llama3.2", prompt="Reply in JSON", format="json")
    assert isinstance(json.loads(result.response), dict)
    parts = client.chat(
        model="llama3.2", messages=[{"role": "user", "content": "JSON"}], format="json", stream=True
    )
    chunks = [p.message.content for p in parts]
    assert len(chunks) > 3
    json.loads("".join(chunks))


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address
    nickname: str | None = None


def test_format_pydantic_schema_validates(client: ollama.Client) -> None:
    schema = Person.model_json_schema()
    result = client.chat(
        model="llama3.2", messages=[{"role": "user", "content": "A person"}], format=schema
    )
    person = Person.model_validate_json(result.message.content)
    assert person.address.city
    jsonschema.validate(json.loads(result.message.content), schema)


def test_format_schema_with_thinking(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    result = client.generate(model="deepseek-r1:14b", prompt="x", format=schema)
    assert result.thinking
    jsonschema.validate(json.loads(result.response), schema)


@pytest.mark.parametrize("model", ["all-minilm", "nomic-embed-text"])
def test_embed_is_normalised_and_deterministic(client: ollama.Client, model: str) -> None:
    result = client.embed(model=model, input=["first text", "second text"])
    assert len(result.embeddings) == 2
    dims = {"all-minilm": 384, "nomic-embed-text": 768}[model]
    for vector in result.embeddings:
        assert len(vector) == dims
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-5)
    assert result.embeddings[0] != result.embeddings[1]
    single = client.embed(model=model, input="first text")
    assert single.embeddings[0] == result.embeddings[0]
    assert result.prompt_eval_count and result.total_duration and result.load_duration


def test_embed_empty_input(http, sim) -> None:
    response = http.post(f"{sim.url}/api/embed", json={"model": "all-minilm", "input": []})
    assert response.json() == {"model": "all-minilm", "embeddings": []}


def test_legacy_embeddings(client: ollama.Client) -> None:
    result = client.embeddings(model="all-minilm", prompt="hello")
    assert len(result.embedding) == 384


def test_list(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    assert {"llama3.2:latest", "llava:7b", "deepseek-r1:14b", "all-minilm:latest"} <= set(models)
    llama = models["llama3.2:latest"]
    assert llama.size > 0 and len(llama.digest) == 64
    assert llama.details.family == "llama" and llama.details.parameter_size == "3.2B"
    assert llama.modified_at is not None


def test_ps_lists_loaded_models_longest_expiry_first(client: ollama.Client) -> None:
    assert client.ps().models == []
    client.generate(model="llama3.2", prompt="hi", keep_alive="10m")
    client.generate(model="llava:7b", prompt="hi", keep_alive=-1)
    client.generate(model="deepseek-r1:14b", prompt="hi", keep_alive="1m")
    models = client.ps().models
    assert [m.model for m in models] == ["llava:7b", "llama3.2:latest", "deepseek-r1:14b"]
    assert models[0].expires_at.year > 2300
    assert models[0].context_length == 4096 and models[0].size_vram == models[0].size


def test_show(client: ollama.Client) -> None:
    shown = client.show("llava:7b")
    assert "vision" in shown.capabilities and "completion" in shown.capabilities
    assert shown.details.family == "llama"
    assert shown.modelinfo is not None and shown.modified_at is not None
    assert client.show("all-minilm").capabilities == ["embedding"]


@pytest.mark.parametrize("stream", [False, True])
def test_pull(client: ollama.Client, stream: bool) -> None:
    if not stream:
        assert client.pull("llama3.2").status == "success"
        return
    statuses = [p for p in client.pull("llama3.2", stream=True)]
    assert statuses[0].status == "pulling manifest"
    assert statuses[-1].status == "success"
    layer = [p for p in statuses if p.digest]
    assert layer[0].completed is None and layer[-1].completed == layer[-1].total
    assert {"verifying sha256 digest", "writing manifest"} <= {p.status for p in statuses}


def test_load_and_unload_requests(client: ollama.Client, admin) -> None:
    loaded = client.generate(model="llama3.2", prompt="")
    assert loaded.done_reason == "load" and loaded.response == ""
    assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    unloaded = client.chat(model="llama3.2", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload" and unloaded.message.role == "assistant"
    assert client.ps().models == []
    assert admin.stats()["loads"] == 1 and admin.stats()["unloads"] == 1


def test_load_reply_is_one_object_even_when_streaming(http, sim) -> None:
    response = http.post(f"{sim.url}/api/generate", json={"model": "llama3.2"})
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    body = response.json()
    assert body["done_reason"] == "load" and body["done"] is True
    assert set(body) == {"model", "created_at", "response", "done", "done_reason"}


def test_model_names_are_canonicalised(client: ollama.Client) -> None:
    full = client.generate(model="registry.ollama.ai/library/llama3.2:latest", prompt="x")
    short = client.generate(model="llama3.2", prompt="x")
    assert full.model == "registry.ollama.ai/library/llama3.2:latest"
    assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    assert short.load_duration < 50_000_000
