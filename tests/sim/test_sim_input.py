"""Hostile input: the simulator answers what Ollama answers, and never builds an unbounded reply."""

from __future__ import annotations

import pytest
import requests

from ollama_sim.config import default_models
from ollama_sim.replies import ReplyRequest, compose
from ollama_sim.schema import ROOM_CHARS, instance_for
from ollama_sim.textgen import seed_for


def nested(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            b'{"model":"llama3.2","prompt":"x","options":{"temperature":1.8e308}}',
            "json: cannot unmarshal number 1.8e308 into Go struct field GenerateRequest.options "
            "of type float64",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","options":{"stop":["a", -1e400]}}',
            "json: cannot unmarshal number -1e400 into Go struct field GenerateRequest.options "
            "of type float64",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","options":{"seed":1' + b"0" * 400 + b"}}",
            "json: cannot unmarshal number 1" + "0" * 400 + " into Go struct field "
            "GenerateRequest.options of type float64",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","top_logprobs":1e400}',
            "json: cannot unmarshal number 1e400 into Go struct field GenerateRequest.top_logprobs "
            "of type int",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","keep_alive":1e999}',
            "json: cannot unmarshal number 1e999 into Go struct field GenerateRequest.keep_alive "
            "of type float64",
        ),
        (
            b'{"model":"llama3.2","prompt":1e400}',
            "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type "
            "string",
        ),
        (
            b'{"model":"llama3.2","prompt":"x","options":{"x":' + nested(10_001).encode() + b"}}",
            "invalid character '[' exceeded max depth",
        ),
    ],
)
def test_numbers_beyond_a_float64_and_nesting_beyond_go_are_ollamas_400(
    http: requests.Session, sim, body: bytes, text: str
) -> None:
    response = http.post(f"{sim.url}/api/generate", data=body, timeout=30)
    assert (response.status_code, response.json()) == (400, {"error": text})


def test_chat_names_its_own_struct(http: requests.Session, sim) -> None:
    body = b'{"model":"llama3.2","messages":[],"options":{"temperature":2e308}}'
    response = http.post(f"{sim.url}/api/chat", data=body, timeout=30)
    assert response.json() == {
        "error": "json: cannot unmarshal number 2e308 into Go struct "
        "field ChatRequest.options of type float64"
    }


def test_deep_nesting_go_accepts_is_served(http: requests.Session, sim) -> None:
    """Go decodes up to 10,000 levels; Python's decoder gives up near 1,000."""
    ignored = nested(9_990)
    body = (
        '{"model":"llama3.2","prompt":"hi","stream":false,"options":{"x":'
        + ignored
        + '},"unknown":'
        + ignored
        + "}"
    )
    response = http.post(f"{sim.url}/api/generate", data=body.encode(), timeout=30)
    assert response.status_code == 200 and response.json()["done"]
    deep_schema = '{"type":"object","properties":{"a":' * 3000 + "{}" + "}}" * 3000
    body = '{"model":"llama3.2","prompt":"hi","stream":false,"format":' + deep_schema + "}"
    response = http.post(f"{sim.url}/api/generate", data=body.encode(), timeout=30)
    assert response.status_code == 200 and response.json()["response"].startswith("{")
    deep_arguments = (
        '{"model":"llama3.2","stream":false,"messages":[{"role":"assistant",'
        '"tool_calls":[{"function":{"name":"f","arguments":{"a":' + nested(5_000, "{}") + "}}}]},"
        '{"role":"user","content":"and now?"}]}'
    )
    response = http.post(f"{sim.url}/api/chat", data=deep_arguments.encode(), timeout=30)
    assert response.status_code == 200 and response.json()["message"]["content"]


def test_lone_surrogates_become_replacement_characters_as_in_go(
    http: requests.Session, sim
) -> None:
    body = b'{"model":"llama3.2","prompt":"why \\ud800 and \\udfff?","stream":false}'
    response = http.post(f"{sim.url}/api/generate", data=body, timeout=30)
    assert response.status_code == 200 and response.json()["done"]
    chat = (
        b'{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"\\ud83d",'
        b'"\\udc00":"key"}]}'
    )
    response = http.post(f"{sim.url}/api/chat", data=chat, timeout=30)
    assert response.status_code == 200 and response.json()["message"]["content"]
    invalid_utf8 = b'{"model":"llama3.2","prompt":"bytes \xed\xa0\x80 here","stream":false}'
    response = http.post(f"{sim.url}/api/generate", data=invalid_utf8, timeout=30)
    assert response.status_code == 200


def test_num_predict_is_bounded_by_ten_context_windows_as_in_ollama(
    http: requests.Session, sim
) -> None:
    body = {
        "model": "llama3.2",
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 10**22, "num_ctx": 256},
    }
    reply = http.post(f"{sim.url}/api/generate", json=body, timeout=30).json()
    assert (reply["eval_count"], reply["done_reason"]) == (2560, "length")
    body["options"] = {"num_predict": 1_000_000, "num_ctx": 1024}
    reply = http.post(f"{sim.url}/api/generate", json=body, timeout=30).json()
    assert (reply["eval_count"], reply["done_reason"]) == (10_240, "length")


def test_a_reply_never_exceeds_the_simulators_cap(start_sim) -> None:
    sim = start_sim(max_reply_tokens=300, no_delay=True)
    body = {
        "model": "llama3.2",
        "prompt": "hi",
        "stream": False,
        "options": {"num_predict": 100_000, "num_ctx": 131_072},
    }
    reply = requests.post(f"{sim.url}/api/generate", json=body, timeout=30).json()
    assert (reply["eval_count"], reply["done_reason"]) == (300, "length")


def test_a_schema_cannot_make_the_document_unbounded() -> None:
    huge = {"type": "array", "minItems": 10**12, "items": {"type": "string", "minLength": 10**12}}
    document = instance_for(huge, 1)
    assert sum(len(item) for item in document) <= ROOM_CHARS + 100
    nested_arrays = {"type": "array", "minItems": 1000}
    nested_arrays["items"] = {"type": "array", "minItems": 1000, "items": dict(nested_arrays)}
    assert sum(len(row) for row in instance_for(nested_arrays, 1)) * 8 <= ROOM_CHARS + 8000
    cyclic = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    instance_for(cyclic, 1)  # ends (a $ref cycle used to recurse until RecursionError)
    odd = {"type": "number", "minimum": "low", "maximum": 1e400, "multipleOf": 1e-300}
    assert isinstance(instance_for(odd, 1), int | float)


def test_a_huge_schema_reply_is_cut_like_a_long_generation(http: requests.Session, sim) -> None:
    schema = {"type": "array", "minItems": 10**9, "items": {"type": "string"}}
    body = {"model": "llama3.2", "prompt": "hi", "stream": False, "format": schema}
    reply = http.post(f"{sim.url}/api/generate", json=body, timeout=60).json()
    assert (reply["eval_count"], reply["done_reason"]) == (40_960, "length")  # 10 × 4096


def test_embed_inputs_are_bounded(http: requests.Session, sim) -> None:
    body = {"model": "all-minilm", "input": ["a"] * 10_001}
    response = http.post(f"{sim.url}/api/embed", json=body, timeout=30)
    assert response.status_code == 400 and "at most 10000 inputs" in response.json()["error"]


def test_seeds_and_replies_survive_deep_values() -> None:
    deep: object = {}
    for _ in range(5_000):
        deep = {"a": deep}
    assert seed_for("chat", deep) == seed_for("chat", deep)
    reply = compose(
        ReplyRequest(
            model=default_models()[0], prompt="x", seed_material=[deep], prompt_text_len=1, fmt=deep
        )
    )
    assert reply.content
