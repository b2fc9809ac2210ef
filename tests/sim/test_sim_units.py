"""Unit tests for the pure parts: Go formats, schemas, images, text, public surface."""

from __future__ import annotations

import io
import json
from typing import Literal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import BaseModel, Field

import ollama_sim
from ollama_sim.gojson import decode_json_body
from ollama_sim.golike import (
    FOREVER_S,
    GoError,
    parse_go_duration,
    parse_keep_alive,
    parse_model_name,
    utc_timestamp,
)
from ollama_sim.images import sniff
from ollama_sim.schema import instance_for
from ollama_sim.textgen import json_tokens, reply_source


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("300ms", 0.3),
        ("0", 0),
        ("-1m", -60),
        ("2h45m10s", 9910),
        ("10us", 1e-5),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("", 'time: invalid duration ""'),
        ("m", 'time: invalid duration "m"'),
    ],
)
def test_go_duration_errors(text: str, error: str) -> None:
    with pytest.raises(GoError, match=error.replace("(", r"\(")):
        parse_go_duration(text)


def test_keep_alive_values() -> None:
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(30) == 30
    assert parse_keep_alive(-1) == FOREVER_S
    assert parse_keep_alive("-5m") == FOREVER_S
    assert parse_keep_alive("10m") == 600


def test_json_body_ignores_trailing_data_like_go() -> None:
    assert decode_json_body(b' {"a": 1} trailing') == {"a": 1}
    with pytest.raises(EOFError):
        decode_json_body(b"\n\t ")
    with pytest.raises(GoError, match="looking for beginning of value"):
        decode_json_body(b'{"a": NaN}')


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("LLaMA3.2:Latest", "llama3.2:latest"),
        ("registry.ollama.ai/library/llava:7b", "llava:7b"),
        ("user/model:v1", "user/model:v1"),
    ],
)
def test_model_names(name: str, short: str) -> None:
    parsed = parse_model_name(name)
    assert parsed is not None and parsed.short == short


@pytest.mark.parametrize("name", ["", "bad name", "a:b:c", "-x", "a/b/c/d"])
def test_invalid_model_names(name: str) -> None:
    assert parse_model_name(name) is None


def test_utc_timestamp_trims_zeros() -> None:
    assert utc_timestamp(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    assert utc_timestamp(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"


class Pet(BaseModel):
    kind: Literal["cat", "dog"]
    name: str = Field(min_length=3, max_length=8)


class Owner(BaseModel):
    id: int = Field(ge=10, le=20)
    score: float = Field(gt=0, lt=1)
    pets: list[Pet] = Field(min_length=2, max_length=4)
    best: Pet | None
    labels: dict[str, int]
    active: bool
    nothing: None = None
    version: Literal[3] = 3


SCHEMAS = [
    Owner.model_json_schema(),
    {"type": "array", "items": {"type": "integer", "multipleOf": 5, "minimum": 1}, "minItems": 4},
    {"type": "string", "format": "date-time"},
    {
        "type": "object",
        "properties": {
            "uuid": {"type": "string", "format": "uuid"},
            "email": {"type": "string", "format": "email"},
        },
        "required": ["uuid", "email"],
        "additionalProperties": False,
    },
    {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]},
            {"properties": {"b": {"const": "x"}}, "required": ["b"]},
        ]
    },
    {"oneOf": [{"type": "null"}, {"type": "string"}]},
    {"type": ["string", "null"], "enum": ["red", "green"]},
    {"type": "object", "properties": {"child": {"$ref": "#"}}},
    {"prefixItems": [{"type": "boolean"}, {"type": "string"}], "items": False, "minItems": 2},
]


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", range(5))
def test_schema_instances_validate(schema: dict, seed: int) -> None:
    document = instance_for(schema, seed)
    jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())
    assert instance_for(schema, seed) == document


@settings(max_examples=60, deadline=None)
@given(
    low=st.integers(-1000, 1000),
    span=st.integers(0, 50),
    items=st.integers(0, 5),
    length=st.integers(0, 20),
    seed=st.integers(0, 2**32),
)
def test_schema_bounds(low: int, span: int, items: int, length: int, seed: int) -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": low, "maximum": low + span},
            "x": {"type": "number", "minimum": low, "maximum": low + span},
            "s": {"type": "string", "minLength": length, "maxLength": length + 5},
            "a": {
                "type": "array",
                "items": {"type": "boolean"},
                "minItems": items,
                "maxItems": items + 2,
            },
        },
        "required": ["n", "x", "s", "a"],
    }
    jsonschema.validate(instance_for(schema, seed), schema)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("WEBP", "WebP"), ("BMP", "BMP")],
)
def test_sniff_images(fmt: str, name: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (37, 21)).save(buffer, format=fmt)
    info = sniff(buffer.getvalue())
    assert info is not None and (info.format, info.width, info.height) == (name, 37, 21)


def test_sniff_webp_lossless_and_junk() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 7)).save(buffer, format="WEBP", lossless=True)
    info = sniff(buffer.getvalue())
    assert info is not None and (info.width, info.height) == (300, 7)
    assert sniff(b"hello world") is None
    assert sniff(b"\x89PNG\r\n\x1a\n") is None


def test_text_is_deterministic_and_json_tokens_round_trip() -> None:
    first = "".join(reply_source(42, "queues and workers").natural())
    assert first == "".join(reply_source(42, "queues and workers").natural())
    assert first != "".join(reply_source(43, "queues and workers").natural())
    text = json.dumps({"a": 'quote " and \\ slash', "b": [1, 2.5, None, True]}, indent=2)
    assert "".join(json_tokens(text)) == text


def test_public_surface_is_complete() -> None:
    public = {name for name in dir(ollama_sim) if not name.startswith("_")}
    modules = {
        "admin",
        "api",
        "cli",
        "completion",
        "config",
        "embeddings",
        "faults",
        "generation",
        "gojson",
        "golike",
        "http",
        "images",
        "parts",
        "replies",
        "scheduler",
        "schema",
        "server",
        "stats",
        "textgen",
        "validation",
    }
    assert public - modules == set(ollama_sim.__all__)
