"""Property-based checks: whatever arrives, validation answers InvalidRequest or a clean payload."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.errors import InvalidRequest
from tasks.payloads import KINDS, dump_payload, validate_payload

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "model",
        "prompt",
        "messages",
        "options",
        "schema",
        "images",
        "system",
        "format",
        "raw",
        "think",
        "tools",
        "keep_alive",
    ]
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), data=st.dictionaries(field_names, json_values, max_size=6))
def test_anything_is_refused_cleanly_or_accepted(kind: str, data: dict) -> None:
    try:
        payload = validate_payload(kind, data)
    except InvalidRequest as exc:
        assert exc.message.startswith(("invalid ", "images")) or "image" in exc.message
        return
    # an accepted payload survives the broker's JSON and validates again to the same thing
    again = validate_payload(kind, json.loads(json.dumps(dump_payload(payload))))
    assert again == payload


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(min_size=1, max_size=500).filter(str.strip), seed=st.integers(-(2**31), 2**31)
)
def test_valid_generate_round_trips_unchanged(prompt: str, seed: int) -> None:
    payload = validate_payload(
        "generate", {"model": "llama3.2", "prompt": prompt, "options": {"seed": seed}}
    )
    assert payload.prompt == prompt and payload.options.seed == seed
    assert payload.model == "llama3.2:latest"


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "user", "assistant", "tool", "robot", ""]),
                "content": st.text(max_size=50),
            }
        ),
        max_size=5,
    )
)
def test_chat_roles_are_checked(messages: list[dict]) -> None:
    valid_roles = {"system", "user", "assistant", "tool"}
    try:
        validate_payload("chat", {"model": "llama3.2", "messages": messages})
    except InvalidRequest as exc:
        assert not messages or any(m["role"] not in valid_roles for m in messages)
        assert exc.field is not None
    else:
        assert messages and all(m["role"] in valid_roles for m in messages)
