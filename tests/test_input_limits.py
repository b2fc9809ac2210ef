"""Bad input at the door: InvalidRequest naming the field, nothing stored, nothing enqueued.

Contract checks first (no Redis), then the SDK, the worker and the CLI against real ones.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from producers.client import Client
from tasks.errors import InvalidRequest
from tasks.images import inspect_image
from tasks.keys import blob_key
from tasks.payloads import validate_payload
from tasks.settings import Settings
from tasks.untrusted import lone_surrogate, parse_json, replace_lone_surrogates, too_deep

WAIT_S = 60
LIMITS = Settings.model_construct()


def png_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes of PNG whose header claims ``width`` × ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def png(width: int, height: int, noise: bool = False) -> bytes:
    if noise:  # random pixels do not compress: a file larger than the inline limit
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
    else:
        image = Image.new("RGB", (width, height), (20, 120, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def refusal(kind: str, data: dict[str, Any], limits: Settings = LIMITS) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_payload(kind, data, limits)
    return info.value


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("num_predict", 10**22, "CORRAL_MAX_NUM_PREDICT"),
        ("num_ctx", 10**9, "CORRAL_MAX_NUM_CTX"),
        ("num_batch", 10**9, "CORRAL_MAX_NUM_CTX"),
        ("num_keep", 10**9, "CORRAL_MAX_NUM_CTX"),
        ("repeat_last_n", 10**9, "CORRAL_MAX_NUM_CTX"),
        ("num_thread", 10**9, "CORRAL_MAX_NUM_THREAD"),
        ("seed", 2**63, "64-bit integer"),
        ("seed", -(2**63) - 1, "64-bit integer"),
        ("top_k", 2**31, "32-bit integer"),
        ("num_gpu", 2**31, "32-bit integer"),
        ("main_gpu", 2**40, "32-bit integer"),
        ("temperature", 1.8e308, "finite"),  # JSON's 1.8e308 is Python's inf
        ("temperature", 1e39, "32-bit float"),
        ("temperature", 10**400, "valid number"),
        ("repeat_penalty", 3.5e38, "32-bit float"),
        ("presence_penalty", -1e39, "32-bit float"),
        ("frequency_penalty", float("nan"), "finite"),
        ("num_keep", -2, "greater than or equal to -1"),
    ],
)
def test_options_are_bounded_by_what_ollama_holds(option: str, value: Any, says: str) -> None:
    error = refusal("generate", {"model": "m", "prompt": "p", "options": {option: value}})
    assert error.field == f"options.{option}" and says in error.message
    assert len(error.message) < 400  # a 400-digit number is described, not printed


def test_values_ollama_accepts_still_pass() -> None:
    options = {
        "num_predict": -2,
        "num_ctx": 262_144,
        "num_thread": 1024,
        "num_gpu": 999,
        "main_gpu": 0,
        "seed": -(2**63),
        "top_k": 2**31 - 1,
        "temperature": 0,
        "repeat_penalty": 3.4e38,
        "presence_penalty": -2,
        "num_keep": -1,
    }
    payload = validate_payload("generate", {"model": "m", "prompt": "p", "options": options})
    assert payload.options is not None and payload.options.seed == -(2**63)
    assert validate_payload(
        "generate", {"model": "m", "prompt": "p", "options": {"num_predict": 131_072}}
    )


def test_option_limits_without_a_natural_bound_are_settings() -> None:
    tight = Settings.model_construct(max_num_predict=64, max_num_ctx=2048, max_num_thread=8)
    data = {"model": "m", "prompt": "p"}
    assert validate_payload("generate", {**data, "options": {"num_predict": 64}}, tight)
    for option, value in (("num_predict", 65), ("num_ctx", 2049), ("num_thread", 9)):
        error = refusal("generate", {**data, "options": {option: value}}, tight)
        assert error.field == f"options.{option}" and "raise that setting" in error.message


# -- nesting and Unicode ------------------------------------------------------------------------
def test_deep_nesting_is_refused_naming_the_field() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("structured", {"model": "m", "prompt": "p", "schema": nested(3000)}, "schema"),
        ("generate", {"model": "m", "prompt": "p", "format": nested(3000)}, "format"),
        (
            "chat",
            {**chat, "tools": [{"function": {"name": "f", "parameters": nested(3000)}}]},
            "tools",
        ),
        (
            "chat",
            {
                "model": "m",
                "messages": [{"role": "assistant", "content": "", "tool_calls": [nested(3000)]}],
            },
            "messages",
        ),
    ]
    for kind, data, field in cases:
        error = refusal(kind, data)
        assert error.field == field and "CORRAL_MAX_JSON_DEPTH" in error.message


def test_nesting_limit_is_a_setting_and_schema_depth_still_applies() -> None:
    data = {"model": "m", "prompt": "p", "format": {"type": "object", "properties": nested(20)}}
    assert "nests deeper than 16" in refusal("generate", data).message  # CORRAL_MAX_SCHEMA_DEPTH
    shallow = Settings.model_construct(max_json_depth=3)
    error = refusal(
        "generate",
        {"model": "m", "prompt": "p", "options": {"stop": ["x"]}, "format": nested(3)},
        shallow,
    )
    assert error.field == "format"


def test_unpaired_surrogates_are_refused_naming_the_field() -> None:
    error = refusal("generate", {"model": "m", "prompt": "half a pair: \ud83d"})
    assert error.field == "prompt" and "surrogate" in error.message
    error = refusal(
        "chat",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "fine"},
                {"role": "user", "content": "\udc00"},
            ],
        },
    )
    assert error.field == "messages.1.content"
    error = refusal(
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"function": {"name": "f", "\ud800": 1}}],
        },
    )
    assert error.field == "tools.0.function.\\ud800"
    assert validate_payload("generate", {"model": "m", "prompt": "a real pair: 😀"})


def test_untrusted_values_are_walked_without_recursion() -> None:
    deep = nested(100_000)
    assert too_deep(deep, 64) == ("a",) * 64
    assert lone_surrogate([deep, ["ok", "bad \ud800"]]) == (1, 1)
    assert replace_lone_surrogates({"k\udfff": ["\ud800x"]}) == {"k\ufffd": ["\ufffdx"]}
    for text, says in (
        ("[" * 5000 + "]" * 5000, "CORRAL_MAX_JSON_DEPTH"),
        ("[" * 70 + "]" * 70, "CORRAL_MAX_JSON_DEPTH"),
        ('{"t": 1e400}', "out of range"),
        ('{"t": NaN}', "NaN"),
        ("{", "not valid JSON"),
    ):
        with pytest.raises(InvalidRequest, match=says) as info:
            parse_json(text, what="the body", max_depth=64, field="body")
        assert info.value.field == "body"


# -- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(30_000, 30_000), (8_000, 8_000)])
def test_an_image_claiming_too_many_pixels_is_refused_from_its_header(size: tuple) -> None:
    bomb = base64.b64encode(png_claiming(*size)).decode()
    error = refusal("multimodal", {"model": "llava:7b", "prompt": "p", "images": [bomb]})
    assert error.field == "images[0]"
    assert "CORRAL_MAX_IMAGE_PIXELS" in error.message and "scale it down" in error.message


def test_the_pixel_limit_is_a_setting() -> None:
    image = png(100, 100)
    inspect_image(image, max_bytes=10**6, max_pixels=10_000)
    with pytest.raises(InvalidRequest, match="100×100 pixels, over the 9,999-pixel limit"):
        inspect_image(image, max_bytes=10**6, max_pixels=9_999, field="images[2]")


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "a PDF document"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "an SVG drawing"),
        (bytes(range(256)) * 4, "not an image Pillow can read; send PNG, JPEG, WebP or GIF"),
    ],
)
def test_a_non_image_says_what_it_is(data: bytes, says: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        inspect_image(data, max_bytes=10**6, max_pixels=10**6, field="messages[0].images[1]")
    assert info.value.field == "messages[0].images[1]"
    assert says in info.value.message and "BytesIO" not in info.value.message
    assert info.value.message.startswith("messages[0].images[1]: not an image Pillow can read")


# -- the SDK ------------------------------------------------------------------------------------
def test_chat_messages_must_be_a_list_of_messages(client: Client) -> None:
    before = client.redis.llen("corral.llama3.2:latest")
    for messages in ("hi", [1], [{"role": "user", "content": "x"}, "y"], None):
        with pytest.raises(InvalidRequest) as info:
            client.chat("llama3.2", messages)  # type: ignore[arg-type]
        assert info.value.field == "messages" and "role" in info.value.message
    with pytest.raises(InvalidRequest, match="expected a list of images"):
        client.multimodal("llava:7b", "x", png(4, 4))  # type: ignore[arg-type]
    assert client.redis.llen("corral.llama3.2:latest") == before


def test_multimodal_validates_everything_before_storing_an_image(client: Client) -> None:
    big = png(300, 300, noise=True)
    assert len(big) > client.settings.inline_image_max_bytes
    key = blob_key(hashlib.sha256(big).hexdigest())
    with pytest.raises(InvalidRequest, match="options.temprature"):
        client.multimodal("llava:7b", "What is this?", [big], options={"temprature": 0.1})
    with pytest.raises(InvalidRequest, match="messages.0.role"):
        client.chat("llava:7b", [{"role": "robot", "content": "x", "images": [big]}])
    with pytest.raises(InvalidRequest, match="prompt"):
        client.multimodal("llava:7b", "   ", [big])
    assert not client.redis.exists(key)
    assert client.redis.llen("corral.llava:7b") == 0


def test_the_sdk_refuses_a_bomb_naming_the_image(client: Client) -> None:
    with pytest.raises(InvalidRequest) as info:
        client.multimodal("llava:7b", "x", [png(8, 8), png_claiming(30_000, 30_000)])
    assert info.value.field == "images[1]" and "CORRAL_MAX_IMAGE_PIXELS" in info.value.message


@pytest.mark.usefixtures("worker")
def test_the_worker_refuses_a_bomb_sent_around_the_sdk(client: Client) -> None:
    bomb = base64.b64encode(png_claiming(30_000, 30_000)).decode()
    async_result = client.app.send_task(
        "corral.multimodal",
        kwargs={"payload": {"model": "llava:7b", "prompt": "x", "images": [bomb]}},
        queue="corral.llava:7b",
    )
    with pytest.raises(InvalidRequest) as info:
        async_result.get(timeout=WAIT_S, propagate=True)
    assert "CORRAL_MAX_IMAGE_PIXELS" in info.value.message and "images" in info.value.message


# -- the CLI ------------------------------------------------------------------------------------
def corral(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('[{"role": "user", "content": "hi"}', "--history"),
        ('{"role": "user", "content": "hi"}', "must hold a JSON array"),
        ("[" * 5000 + "]" * 5000, "CORRAL_MAX_JSON_DEPTH"),
        ("[1]", "messages"),
    ],
)
def test_a_bad_history_file_is_one_line_naming_it(
    redis_url: str, tmp_path: Path, content: str, says: str
) -> None:
    history = tmp_path / "history.json"
    history.write_text(content)
    run = corral(redis_url, "submit", "chat", "llama3.2", "and then?", "--history", str(history))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and says in run.stderr
    error_line = run.stderr.splitlines()[0]
    assert error_line.startswith("error: ") and ("--history" in error_line or says in error_line)
    missing = corral(redis_url, "submit", "chat", "llama3.2", "x", "--history", "/nope.json")
    assert missing.returncode == 2 and "--history" in missing.stderr


def test_a_schema_nested_too_deep_is_refused_by_the_cli(redis_url: str, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(
        json.dumps({"type": "object"})[:-1] + ', "x": ' + "[" * 3000 + "]" * 3000 + "}"
    )
    run = corral(redis_url, "submit", "structured", "llama3.2", "p", "--schema", str(schema))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "CORRAL_MAX_JSON_DEPTH" in run.stderr


def test_a_structured_reply_nested_too_deep_is_a_problem_not_a_crash() -> None:
    from jsonschema import Draft202012Validator

    from tasks.kinds.structured import _schema_problem

    validator = Draft202012Validator({"type": "array"})
    for reply in ("[" * 5000 + "]" * 5000, "[" * 100 + "]" * 100):
        assert _schema_problem(reply, validator, 64) == "it nests deeper than 64 levels"
    assert _schema_problem("[[1]]", validator, 64) is None
