"""Error statuses and texts, as the official client and raw HTTP see them."""

from __future__ import annotations

import base64
import threading

import ollama
import pytest
import requests
from sim_support import BUSY, WEATHER_TOOL, wait_event, wait_stats


@pytest.mark.parametrize(
    ("call", "status", "text"),
    [
        (
            lambda c, s: c.generate(model="nope", prompt="x", stream=s),
            404,
            "model 'nope' not found",
        ),
        (
            lambda c, s: c.chat(model="nope:1b", messages=[], stream=s),
            404,
            "model 'nope:1b' not found",
        ),
        (lambda c, s: c.embed(model="ghost", input="x"), 404, "model 'ghost' not found"),
        (lambda c, s: c.show("ghost"), 404, "model 'ghost' not found"),
        (
            lambda c, s: c.generate(model="bad name!", prompt="x", stream=s),
            404,
            "model 'bad name!' not found",
        ),
        (lambda c, s: c.chat(model="bad name!", messages=[], stream=s), 400, "model is required"),
        (lambda c, s: c.show("bad name!"), 400, "invalid model name"),
        (lambda c, s: c.pull("bad name!", stream=s), 400, "invalid model name"),
        (
            lambda c, s: c.generate(model="llama3.2", prompt="x", think=True, stream=s),
            400,
            '"llama3.2" does not support thinking',
        ),
        (
            lambda c, s: c.chat(
                model="llava:7b",
                messages=[{"role": "user", "content": "x"}],
                tools=[WEATHER_TOOL],
                stream=s,
            ),
            400,
            "registry.ollama.ai/library/llava:7b does not support tools",
        ),
        (
            lambda c, s: c.generate(model="all-minilm", prompt="x", stream=s),
            400,
            '"all-minilm" does not support generate',
        ),
        (
            lambda c, s: c.chat(
                model="all-minilm", messages=[{"role": "user", "content": "x"}], stream=s
            ),
            400,
            '"all-minilm" does not support chat',
        ),
        (
            lambda c, s: c.generate(model="llama3.2", prompt="x", suffix="y", stream=s),
            400,
            "registry.ollama.ai/library/llama3.2:latest does not support insert",
        ),
        (
            lambda c, s: c.embed(model="llama3.2", input="x"),
            400,
            '"llama3.2" does not support embeddings',
        ),
        (
            lambda c, s: c.generate(model="llama3.2", prompt="x", raw=True, system="s", stream=s),
            400,
            "raw mode does not support template, system, or context",
        ),
        (
            lambda c, s: c.generate(
                model="llama3.2", prompt="x", options={"temperature": "hot"}, stream=s
            ),
            500,
            'option "temperature" must be of type float32',
        ),
        (
            lambda c, s: c.generate(
                model="llama3.2", prompt="x", options={"num_ctx": "big"}, stream=s
            ),
            500,
            'option "num_ctx" must be of type integer',
        ),
        (
            lambda c, s: c.generate(model="llama3.2", prompt="x", options={"stop": "x"}, stream=s),
            500,
            'option "stop" must be of type array',
        ),
        (
            lambda c, s: c.generate(
                model="llava:7b", prompt="x", images=[b"not an image at all"], stream=s
            ),
            500,
            "Failed to create new sequence: failed to process inputs: image: unknown format",
        ),
        (
            lambda c, s: c.generate(
                model="llama3.2",
                prompt="x",
                stream=s,
                images=[base64.b64encode(b"\x89PNG").decode()],
            ),
            400,
            "this model is missing data required for image input",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_client_errors(client: ollama.Client, call, status: int, text: str, stream: bool) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        result = call(client, stream)
        if stream and not isinstance(result, ollama.ShowResponse | ollama.EmbedResponse):
            list(result)
    assert (info.value.status_code, info.value.error) == (status, text)


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"", 400, "missing request body"),
        (b"   ", 400, "missing request body"),
        (b"{", 400, "unexpected EOF"),
        (b'{"model": }', 400, "invalid character '}' looking for beginning of value"),
        (b"{model:1}", 400, "invalid character 'm' looking for beginning of object key string"),
        (b'{"model" 1}', 400, "invalid character '1' after object key"),
        (b'{"model":"x" "prompt":"y"}', 400, "invalid character '\"' after object key:value pair"),
        (b'{"images":["a" "b"]}', 400, "invalid character '\"' after array element"),
        (b"[]", 400, "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
        (
            b'{"model":"llama3.2","prompt":5}',
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string",
        ),
        (
            b'{"model":"llama3.2","stream":"yes"}',
            400,
            "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type bool",
        ),
        (
            b'{"model":"llama3.2","images":"abc"}',
            400,
            "json: cannot unmarshal string into Go struct field GenerateRequest.images of type "
            "[]api.ImageData",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","images":["aGVsbG8=!"]}',
            400,
            "illegal base64 data at input byte 8",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","images":["abc"]}',
            400,
            "illegal base64 data at input byte 0",
        ),
        (b'{"model":"llama3.2","keep_alive":"300"}', 400, 'time: missing unit in duration "300"'),
        (b'{"model":"llama3.2","keep_alive":true}', 400, "unsupported duration type: 'bool'"),
        (
            b'{"model":"llama3.2","think":"maybe"}',
            400,
            'invalid think value: "maybe" (must be "high", "medium", "low", true, or false)',
        ),
        (b'{"model":"llama3.2","top_logprobs":30}', 400, "top_logprobs must be between 0 and 20"),
        (b"{}", 404, "model '' not found"),
        (b"null", 404, "model '' not found"),
        (
            b'{"model":"llama3.2","prompt":"x","format":"xml"}',
            500,
            'invalid format: "\\"xml\\""; expected "json" or a valid JSON Schema object',
        ),
    ],
)
def test_generate_request_errors(
    http: requests.Session, sim, body: bytes, status: int, text: str
) -> None:
    response = http.post(f"{sim.url}/api/generate", data=body)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == {"error": text}


@pytest.mark.parametrize(
    ("path", "body", "status", "text"),
    [
        ("/api/chat", b"{}", 400, "model is required"),
        (
            "/api/chat",
            b'{"model":"llama3.2","messages":{}}',
            400,
            "json: cannot unmarshal object into Go struct field ChatRequest.messages of type "
            "[]api.Message",
        ),
        (
            "/api/chat",
            b'{"model":"llama3.2","messages":[{"role":"user","content":1}]}',
            400,
            "json: cannot unmarshal number into Go struct field ChatRequest.messages.content of type "
            "string",
        ),
        (
            "/api/chat",
            b'{"model":"llava:7b","messages":[{"role":"user","images":["%%"]}]}',
            400,
            "illegal base64 data at input byte 0",
        ),
        ("/api/embed", b"{}", 404, "model '' not found"),
        ("/api/embed", b'{"model":"all-minilm","input":[1,2]}', 400, "invalid input type"),
        ("/api/embed", b'{"model":"all-minilm","input":5}', 400, "invalid input type"),
        ("/api/show", b"{}", 400, "model is required"),
        ("/api/pull", b"{}", 400, "invalid model name"),
    ],
)
def test_other_request_errors(
    http: requests.Session, sim, path: str, body: bytes, status: int, text: str
) -> None:
    response = http.post(f"{sim.url}{path}", data=body)
    assert (response.status_code, response.json()) == (status, {"error": text})


def test_unknown_model_pull_stream_reports_in_band(http: requests.Session, sim) -> None:
    response = http.post(f"{sim.url}/api/pull", json={"model": "ghost"})
    assert response.status_code == 200
    assert response.text.splitlines() == [
        '{"status":"pulling manifest"}',
        '{"error":"pull model manifest: file does not exist"}',
    ]


def test_unknown_model_pull_with_client(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        list(client.pull("ghost", stream=True))
    assert (info.value.status_code, info.value.error) == (
        -1,
        "pull model manifest: file does not exist",
    )
    with pytest.raises(ollama.ResponseError) as info:
        client.pull("ghost")
    assert (info.value.status_code, info.value.error) == (
        500,
        "pull model manifest: file does not exist",
    )


def test_queue_full_gives_503(start_sim) -> None:
    """One load in progress plus a full pending queue: the next cold request is refused."""
    sim = start_sim(max_queue=1)
    results: list[int] = []

    def cold_load(model: str) -> None:
        with requests.Session() as own:
            try:
                results.append(
                    own.post(
                        f"{sim.url}/api/generate", json={"model": model}, timeout=60
                    ).status_code
                )
            except requests.RequestException:
                results.append(-1)

    with requests.Session() as http:
        http.put(f"{sim.url}/_sim/config", json={"models": {"llama3.2": {"load_s": 30}}})
        first = threading.Thread(target=cold_load, args=("llama3.2",))
        first.start()
        wait_event(sim.url, lambda e: e["type"] == "load")
        second = threading.Thread(target=cold_load, args=("llava:7b",))
        second.start()
        wait_stats(sim.url, lambda s: s["pending"] == 2)
        response = http.post(
            f"{sim.url}/api/generate", json={"model": "deepseek-r1:14b", "prompt": "x"}
        )
        assert (response.status_code, response.json()) == (503, {"error": BUSY})
        stats = http.get(f"{sim.url}/_sim/stats").json()
        assert stats["rejected_503"] == 1
        assert stats["responses_by_status"]["503"] == 1
    sim.stop()
    first.join(10)
    second.join(10)
    assert results == [-1, -1]
