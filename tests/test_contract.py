"""Pure unit tests of the contract: names, payload validation, errors (no Redis, no Ollama)."""

from __future__ import annotations

import io

import pytest
from celery.backends.base import Backend
from PIL import Image

import producers
import tasks
from tasks.errors import (
    ERROR_TYPES,
    InvalidRequest,
    ModelNotFound,
    OllamaRunnerError,
    StructuredOutputError,
    error_from_dict,
)
from tasks.keys import canonical_model, queue_name
from tasks.payloads import validate_payload
from workers.ollama_client import classify_error, parse_host


def png(width: int = 8, height: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("llama3.2:latest", "llama3.2:latest"),
        ("LLaVA:7B", "llava:7b"),
        ("library/llama3.2", "library/llama3.2:latest"),
        ("registry.example.com:5000/team/model:v1", "registry.example.com:5000/team/model:v1"),
    ],
)
def test_model_names_are_canonical_once(name: str, canonical: str) -> None:
    assert canonical_model(name) == canonical
    assert queue_name(name) == "corral." + canonical


@pytest.mark.parametrize("bad", ["", " ", "llama 3", "a:b:c", "-x", "x/" * 5 + "y", "m;rm -rf"])
def test_bad_model_names_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid model name"):
        canonical_model(bad)


def test_payload_errors_name_the_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_payload("chat", {"model": "llama3.2", "messages": [{"role": "robot"}]})
    assert info.value.field == "messages.0.role"
    assert "messages.0.role" in info.value.message


def test_unknown_and_mistyped_options_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="options.temprature"):
        validate_payload("generate", {"model": "m", "prompt": "p", "options": {"temprature": 1}})
    with pytest.raises(InvalidRequest, match="options.num_predict"):
        validate_payload("generate", {"model": "m", "prompt": "p", "options": {"num_predict": "9"}})
    ok = validate_payload("generate", {"model": "m", "prompt": "p", "options": {"temperature": 1}})
    assert ok.options is not None and ok.options.temperature == 1.0


def test_prompt_text_is_never_edited() -> None:
    prompt = "echo $HOME; cost is `$5` — keep ;$` as they are"
    payload = validate_payload("generate", {"model": "m", "prompt": prompt})
    assert payload.prompt == prompt


def test_limits_come_from_settings() -> None:
    limits = tasks.Settings(max_prompt_chars=10)
    with pytest.raises(InvalidRequest, match="exceeds 10"):
        validate_payload("generate", {"model": "m", "prompt": "x" * 11}, limits)


def test_structured_schema_is_checked() -> None:
    with pytest.raises(InvalidRequest, match="not a valid JSON Schema"):
        validate_payload("structured", {"model": "m", "prompt": "p", "schema": {"type": "nope"}})
    with pytest.raises(InvalidRequest, match="exactly one of 'prompt' or 'messages'"):
        validate_payload("structured", {"model": "m", "schema": {"type": "object"}})


def test_images_must_be_real() -> None:
    import base64

    good = base64.b64encode(png()).decode()
    payload = validate_payload("multimodal", {"model": "llava:7b", "prompt": "p", "images": [good]})
    assert payload.images == [good]
    fake = base64.b64encode(b"GIF89a not really").decode()
    with pytest.raises(InvalidRequest, match=r"images\[0\]: not a readable image"):
        validate_payload("multimodal", {"model": "llava:7b", "prompt": "p", "images": [fake]})
    with pytest.raises(InvalidRequest, match="not valid base64"):
        validate_payload("multimodal", {"model": "llava:7b", "prompt": "p", "images": ["%%%"]})


@pytest.mark.parametrize("cls", list(ERROR_TYPES.values()))
def test_errors_survive_celery_json_round_trip(cls: type) -> None:
    original = cls("it broke", status=500, body="x", model="m", attempts=2)
    backend = Backend(app=tasks.create_app(tasks.Settings()))
    stored = backend.prepare_exception(original, "json")
    rebuilt = backend.exception_to_python(stored)
    assert type(rebuilt) is cls
    assert rebuilt.message == "it broke" and rebuilt.status == 500 and rebuilt.attempts == 2
    assert rebuilt.retryable == original.retryable
    assert type(error_from_dict(original.to_dict())) is cls


def test_error_classification() -> None:
    assert isinstance(classify_error(404, "model 'x' not found", "x"), ModelNotFound)
    crash = classify_error(500, "model runner has unexpectedly stopped, this may be...", "x")
    assert isinstance(crash, OllamaRunnerError) and crash.retryable
    assert classify_error(
        503, "server busy, please try again.  maximum pending requests exceeded", "x"
    ).retryable
    bad_format = classify_error(500, 'invalid format: "xml"; expected "json"', "x")
    assert not bad_format.retryable
    legacy = classify_error(200, "model 'x' not found", "x")
    assert isinstance(legacy, ModelNotFound)
    assert not StructuredOutputError("x").retryable


@pytest.mark.parametrize(
    ("given", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("example.com:8080", "http://example.com:8080"),
        ("https://ollama.example.com", "https://ollama.example.com:443"),
        ("http://[::1]:11434/", "http://[::1]:11434"),
    ],
)
def test_ollama_host_forms(given: str | None, url: str) -> None:
    assert parse_host(given) == url


@pytest.mark.parametrize("package", [tasks, producers])
def test_public_surface_is_complete(package: object) -> None:
    exported = set(package.__all__)  # type: ignore[attr-defined]
    for name in exported:
        assert hasattr(package, name), name
