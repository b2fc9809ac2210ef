"""Bad input at the gateway: 400 on both surfaces, Ollama's answer on the facade, nothing stored."""

from __future__ import annotations

import base64
import hashlib

import ollama
import pytest
import redis
import requests
from test_gateway_support import gateway_url_fixture  # noqa: F401
from test_input_limits import png, png_claiming

from tasks.keys import blob_key
from tasks.settings import Settings

TIMEOUT = (5, 60)
DEEP_OPTIONS = b'{"model":"llama3.2","prompt":"hi","options":{"x":' + b"[" * 5000 + b"]" * 5000
DEEP_OPTIONS += b"}}"


def post(url: str, body: bytes) -> requests.Response:
    return requests.post(
        url, data=body, timeout=TIMEOUT, headers={"Content-Type": "application/json"}
    )


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/show"])
def test_deep_json_is_ollamas_400_on_the_facade(gateway_url: str, path: str) -> None:
    reply = post(gateway_url + path, DEEP_OPTIONS)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert isinstance(error, str) and "CORRAL_MAX_JSON_DEPTH" in error


@pytest.mark.parametrize("kind", ["generate", "chat", "structured", "multimodal"])
def test_deep_json_is_a_typed_400_on_the_native_api(gateway_url: str, kind: str) -> None:
    reply = post(f"{gateway_url}/v1/tasks/{kind}", DEEP_OPTIONS)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "InvalidRequest" and "CORRAL_MAX_JSON_DEPTH" in error["message"]
    deep_but_parsable = {"model": "llama3.2", "prompt": "hi", "format": {"a": [[[[[]]]]]}}
    for _ in range(100):
        deep_but_parsable["format"] = {"a": deep_but_parsable["format"]}
    reply = requests.post(
        f"{gateway_url}/v1/tasks/generate", json=deep_but_parsable, timeout=TIMEOUT
    )
    assert reply.status_code == 400 and reply.json()["error"]["field"] == "format"


@pytest.mark.parametrize(
    ("path", "body", "text"),
    [
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "hi", "stream": "yes"},
            "json: cannot unmarshal string into Go struct field GenerateRequest.stream of type "
            "bool",
        ),
        (
            "/api/chat",
            {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": 1},
            "json: cannot unmarshal number into Go struct field ChatRequest.stream of type bool",
        ),
        (
            "/api/generate",
            {"model": 5, "prompt": "hi"},
            "json: cannot unmarshal number into Go struct field GenerateRequest.model of type "
            "string",
        ),
        (
            "/api/chat",
            {"model": "llama3.2", "messages": [1]},
            "json: cannot unmarshal number into Go struct field ChatRequest.messages of type "
            "api.Message",
        ),
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": "x", "images": "abc"},
            "json: cannot unmarshal string into Go struct field GenerateRequest.images of type "
            "[]api.ImageData",
        ),
    ],
)
def test_a_field_of_the_wrong_json_type_gets_ollamas_answer(
    gateway_url: str, path: str, body: dict, text: str
) -> None:
    reply = requests.post(gateway_url + path, json=body, timeout=TIMEOUT)
    assert (reply.status_code, reply.json()) == (400, {"error": text})


def test_lone_surrogates_become_replacement_characters_as_in_ollama(
    gateway_url: str, settings: Settings, sim
) -> None:
    body = b'{"model":"llama3.2","prompt":"half a pair \\ud83d here","stream":false}'
    reply = post(f"{gateway_url}/api/generate", body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["done"] and reply.json()["response"]
    chat = (
        b'{"model":"llama3.2","stream":false,"messages":[{"role":"user",'
        b'"content":"\\udc00 and bytes \xed\xa0\x80"}]}'
    )
    reply = post(f"{gateway_url}/api/chat", chat)
    assert reply.status_code == 200 and reply.json()["message"]["content"]
    assert sim.stats()["responses_by_status"].get("500", 0) == 0
    # The native API is corral's own: invalid Unicode is refused, naming the field.
    native = post(f"{gateway_url}/v1/tasks/generate", b'{"model":"llama3.2","prompt":"\\ud800"}')
    assert native.status_code == 400 and native.json()["error"]["field"] == "prompt"


def test_out_of_range_options_are_refused_on_both_surfaces(gateway_url: str) -> None:
    for options, field in (
        ({"num_predict": 10**22}, "num_predict"),
        ({"num_thread": 10**9}, "num_thread"),
    ):
        body = {"model": "llama3.2", "prompt": "hi", "options": options}
        facade = requests.post(f"{gateway_url}/api/generate", json=body, timeout=TIMEOUT)
        assert facade.status_code == 400 and f"options.{field}" in facade.json()["error"]
        native = requests.post(f"{gateway_url}/v1/tasks/generate", json=body, timeout=TIMEOUT)
        assert native.json()["error"]["field"] == f"options.{field}"
    huge = b'{"model":"llama3.2","prompt":"hi","options":{"temperature":1.8e308}}'
    for path in ("/api/generate", "/v1/tasks/generate"):
        reply = post(gateway_url + path, huge)
        assert reply.status_code == 400 and "1.8e308" in reply.text


def test_an_image_bomb_is_400_naming_the_image(gateway_url: str) -> None:
    bomb = png_claiming(30_000, 30_000)
    upload = requests.post(
        f"{gateway_url}/v1/tasks/multimodal",
        timeout=TIMEOUT,
        data={"model": "llava:7b", "prompt": "x"},
        files=[("images", ("a.png", png(4, 4))), ("images", ("b.png", bomb))],
    )
    assert upload.status_code == 400
    assert upload.json()["error"]["field"] == "images[1]"
    assert "CORRAL_MAX_IMAGE_PIXELS" in upload.json()["error"]["message"]
    with ollama.Client(host=gateway_url) as client, pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="llava:7b", prompt="x", images=[bomb])
    assert caught.value.status_code == 400 and "CORRAL_MAX_IMAGE_PIXELS" in caught.value.error
    not_an_image = base64.b64encode(b"%PDF-1.7 not a picture").decode()
    reply = requests.post(
        f"{gateway_url}/v1/tasks/multimodal",
        timeout=TIMEOUT,
        json={"model": "llava:7b", "prompt": "x", "images": [not_an_image]},
    )
    assert "a PDF document" in reply.json()["error"]["message"]


def test_nothing_is_stored_when_the_rest_is_refused(gateway_url: str, settings: Settings) -> None:
    big = png(300, 300, noise=True)
    key = blob_key(hashlib.sha256(big).hexdigest())
    encoded = base64.b64encode(big).decode()
    refused = [
        (
            "/v1/tasks/multimodal",
            {"model": "llava:7b", "prompt": "x", "images": [encoded], "options": {"temprature": 1}},
        ),
        (
            "/v1/tasks/chat",
            {
                "model": "llava:7b",
                "messages": [{"role": "robot", "content": "x", "images": [encoded]}],
            },
        ),
        (
            "/api/generate",
            {"model": "llava:7b", "prompt": "x", "images": [encoded], "keep_alive": "300"},
        ),
    ]
    for path, body in refused:
        reply = requests.post(gateway_url + path, json=body, timeout=TIMEOUT)
        assert reply.status_code == 400, reply.text
    with redis.Redis.from_url(settings.redis_url) as client:
        assert not client.exists(key)
