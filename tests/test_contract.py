"""Pure unit tests of the contract: names, payload validation, errors (no Redis, no Ollama)."""

from __future__ import annotations

import ast
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery.backends.base import Backend
from PIL import Image

import producers
import tasks
from tasks.errors import (
    ERROR_TYPES,
    CorralError,
    InvalidRequest,
    ModelNotFound,
    OllamaRequestError,
    OllamaRunnerError,
    OllamaUnavailable,
    StructuredOutputError,
    TaskCancelled,
    TaskTimeout,
    error_from_dict,
)
from tasks.keys import canonical_model, queue_name
from tasks.ollama_boundary import classify_error, corral_error, ollama_errors, translated
from tasks.payloads import validate_payload
from workers.ollama_client import parse_host
from workers.ollama_errors import (
    OllamaConnectError,
    OllamaError,
    OllamaResponseError,
    OllamaStopped,
    OllamaStreamError,
    OllamaTimeout,
    OllamaTLSError,
)

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.parametrize("field", ["temperature", "top_p", "repeat_penalty", "presence_penalty"])
def test_float_options_take_json_integers_but_not_strings_or_booleans(field: str) -> None:
    """JSON has one number type: 1 is a float here (pydantic's strict mode allows it)."""
    ok = validate_payload("generate", {"model": "m", "prompt": "p", "options": {field: 1}})
    value = getattr(ok.options, field)
    assert value == 1.0 and type(value) is float
    for wrong in ("1", True):
        with pytest.raises(InvalidRequest, match=f"options.{field}"):
            validate_payload("generate", {"model": "m", "prompt": "p", "options": {field: wrong}})


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
    with pytest.raises(InvalidRequest, match=r"images\[0\]: not an image Pillow can read"):
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
    ("reported", "expected", "retryable"),
    [
        (OllamaResponseError(404, "model 'x' not found", model="x"), ModelNotFound, False),
        (OllamaResponseError(200, "llama runner process has terminated"), OllamaRunnerError, True),
        (OllamaResponseError(200, "boom", mid_stream=True), OllamaRunnerError, True),
        (OllamaConnectError("cannot reach Ollama for /api/chat: refused"), OllamaUnavailable, True),
        (OllamaTimeout("connecting timed out", phase="connect"), OllamaUnavailable, True),
        (OllamaTimeout("no answer", phase="first_byte"), TaskTimeout, True),
        (OllamaTimeout("stalled", phase="stall"), TaskTimeout, True),
        (OllamaTLSError("TLS to Ollama failed"), OllamaRequestError, False),
        (OllamaStreamError("ended without a final 'done'"), OllamaRunnerError, True),
        (OllamaStopped("stopped on request"), TaskCancelled, False),
    ],
)
def test_the_clients_errors_become_corrals(
    reported: OllamaError, expected: type[CorralError], retryable: bool
) -> None:
    with pytest.raises(expected) as info, ollama_errors():
        raise reported
    assert info.value.retryable is retryable
    assert info.value.__cause__ is reported  # the client's error stays attached
    assert type(corral_error(reported)) is expected

    def stream() -> Iterator[dict]:
        yield {"response": "hi"}
        raise reported

    with pytest.raises(expected):
        list(translated(stream()))


def test_a_mid_stream_failure_has_no_http_status() -> None:
    error = corral_error(OllamaResponseError(200, "runner died", model="m", mid_stream=True))
    assert error.status is None and error.body == "runner died" and "mid-stream" in error.message
    assert corral_error(OllamaStreamError("cut short", model="m")).status is None
    timeout = corral_error(OllamaTimeout("stalled", phase="stall", model="m"))
    assert "CORRAL_STALL_TIMEOUT_S" in timeout.message and timeout.model == "m"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_workers_imports_neither_tasks_nor_producers() -> None:
    """Imports point one way, producers -> tasks -> workers: workers/ knows no corral names."""
    files = sorted((ROOT / "workers").rglob("*.py"))
    assert files
    offending = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in imported_modules(path)
        if name.split(".")[0] in ("tasks", "producers", "monitoring")
    }
    assert not offending, f"workers/ must not import corral's other packages: {offending}"


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
