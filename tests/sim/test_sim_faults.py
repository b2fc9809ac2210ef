"""Fault injection and the /_sim/ admin API."""

from __future__ import annotations

import json
import threading

import jsonschema
import ollama
import pytest
import requests
from sim_support import BUSY, RUNNER_STOPPED, wait_event

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def test_crash_after_tokens_ends_the_stream_with_an_error(client, admin) -> None:
    admin.set_faults(crash_after_tokens=5)
    received = []
    with pytest.raises(ollama.ResponseError) as info:
        for part in client.generate(model="llama3.2", prompt="x", stream=True):
            received.append(part)
    assert (info.value.status_code, info.value.error) == (-1, RUNNER_STOPPED)
    assert len(received) == 5 and not any(p.done for p in received)
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}])
    assert (info.value.status_code, info.value.error) == (500, RUNNER_STOPPED)
    stats = admin.stats()
    assert stats["faults_injected"] == {"crash_after": 2}
    assert stats["generations_started"] == 2 and stats["generations_completed"] == 0


def test_crash_stream_has_an_error_line_and_no_done_line(http, sim, admin) -> None:
    admin.set_faults(fail_next=[{"type": "crash_after", "tokens": 3}])
    response = http.post(
        f"{sim.url}/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 200
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 4 and lines[-1] == {"error": RUNNER_STOPPED}
    assert all(line.get("done") is False for line in lines[:3])
    # one-shot: the next request is healthy
    healthy = http.post(
        f"{sim.url}/api/chat",
        json={"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "x"}]},
    )
    assert healthy.json()["done"] is True


@pytest.mark.parametrize("status", [500, 503, 429])
def test_fail_next_status(client, admin, status: int) -> None:
    admin.set_faults(fail_next=[{"type": "status", "status": status}])
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llama3.2", prompt="x")
    expected = {500: RUNNER_STOPPED, 503: BUSY, 429: "too many requests"}[status]
    assert (info.value.status_code, info.value.error) == (status, expected)
    assert client.generate(model="llama3.2", prompt="x").done
    assert admin.stats()["responses_by_status"] == {str(status): 1, "200": 1}


def test_fail_next_is_fifo_and_respects_the_model_filter(client, admin) -> None:
    admin.set_faults(
        fail_next=[
            {"type": "status", "status": 500, "error": "first", "model": "llava:7b"},
            {"type": "status", "status": 500, "error": "second"},
        ]
    )
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llama3.2", prompt="x")
    assert info.value.error == "second"
    assert len(admin.faults()["fail_next"]) == 1
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llava", prompt="x")  # llava:latest is not llava:7b
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="llava:7b", prompt="x")
    assert info.value.error == "first"
    assert admin.faults()["fail_next"] == []


def test_fail_next_can_aim_at_a_prompt(client, admin) -> None:
    """An entry with ``prompt_contains`` waits for the request that holds the text: another
    client's request of the same model passes it by."""
    admin.set_faults(
        fail_next=[{"type": "status", "status": 500, "error": "mine", "prompt_contains": "#t1"}]
    )
    assert client.generate(model="llama3.2", prompt="someone else").done
    assert client.chat(model="llama3.2", messages=[{"role": "user", "content": "other"}]).done
    assert len(admin.faults()["fail_next"]) == 1
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(
            model="llama3.2",
            messages=[{"role": "system", "content": "#t1"}, {"role": "user", "content": "hi"}],
        )
    assert info.value.error == "mine"
    admin.set_faults(
        fail_next=[{"type": "status", "status": 503, "error": "e", "prompt_contains": "#t2"}]
    )
    assert client.embed(model="all-minilm", input=["a", "b"]).embeddings
    with pytest.raises(ollama.ResponseError) as info:
        client.embed(model="all-minilm", input=["a", "b #t2"])
    assert info.value.status_code == 503
    with pytest.raises(requests.HTTPError):
        admin.set_faults(fail_next=[{"type": "stall", "prompt_contains": 7}])


def test_invalid_format_breaks_the_document_once(client, admin) -> None:
    admin.set_faults(fail_next=[{"type": "invalid_format"}, {"type": "invalid_format"}])
    broken = client.generate(model="llama3.2", prompt="x", format=SCHEMA).response
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(broken), SCHEMA)
    with pytest.raises(json.JSONDecodeError):
        json.loads(client.generate(model="llama3.2", prompt="x", format="json").response)
    good = client.generate(model="llama3.2", prompt="x", format=SCHEMA).response
    jsonschema.validate(json.loads(good), SCHEMA)


def test_close_drops_the_connection(http, sim, admin) -> None:
    admin.set_faults(fail_next=[{"type": "close"}])
    with pytest.raises(requests.ConnectionError):
        http.post(f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x"})
    event = wait_event(sim.url, lambda e: e["type"] == "fault")
    assert event["fault"] == "close"
    assert http.post(
        f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
    ).ok


def test_stall_pauses_the_stream_then_continues(http, sim, admin) -> None:
    admin.set_faults(stall_seconds=0.3, stall_after_tokens=2)
    with http.post(
        f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x"}, stream=True
    ) as response:
        lines = [json.loads(line) for line in response.iter_lines()]
    assert lines[-1]["done"] is True
    assert lines[-1]["eval_duration"] >= 300_000_000
    assert admin.stats()["faults_injected"] == {"stall": 1}


def test_error_rate_is_seeded_and_counted(start_sim) -> None:
    sim = start_sim(seed=11, faults={"error_rate": {"503": 0.5}})
    statuses = []
    with requests.Session() as http:
        for _ in range(40):
            statuses.append(
                http.post(
                    f"{sim.url}/api/embed", json={"model": "all-minilm", "input": "x"}
                ).status_code
            )
        stats = http.get(f"{sim.url}/_sim/stats").json()
    assert set(statuses) == {200, 503}
    assert stats["faults_injected"]["status_503"] == statuses.count(503)
    again = start_sim(seed=11, faults={"error_rate": {"503": 0.5}})
    with requests.Session() as http:
        replay = [
            http.post(
                f"{again.url}/api/embed", json={"model": "all-minilm", "input": "x"}
            ).status_code
            for _ in range(40)
        ]
    assert replay == statuses


def test_fault_admin_get_put_post(admin) -> None:
    assert admin.faults() == {
        "error_rate": {},
        "crash_after_tokens": None,
        "stall_seconds": 0.0,
        "stall_after_tokens": 0,
        "first_byte_delay_seconds": 0.0,
        "legacy_errors": False,
        "fail_next": [],
    }
    admin.faults("PUT", {"error_rate": {"500": 0.1}, "fail_next": [{"type": "close"}]})
    merged = admin.faults(
        "POST",
        {
            "error_rate": {"503": 0.2},
            "legacy_errors": True,
            "fail_next": [{"type": "invalid_format"}],
        },
    )
    assert merged["error_rate"] == {"500": 0.1, "503": 0.2}
    assert [f["type"] for f in merged["fail_next"]] == ["close", "invalid_format"]
    assert merged["legacy_errors"] is True
    replaced = admin.faults("PUT", {"crash_after_tokens": 4})
    assert replaced["error_rate"] == {} and replaced["crash_after_tokens"] == 4
    bad = admin.http.put(f"{admin.url}/_sim/faults", json={"fail_next": [{"type": "boom"}]})
    assert bad.status_code == 400 and "type" in bad.json()["error"]
    assert admin.http.put(f"{admin.url}/_sim/faults", json={"nope": 1}).status_code == 400


def test_reset_clears_everything(client, admin) -> None:
    admin.set_faults(crash_after_tokens=1)
    client.generate(model="llama3.2", prompt="")
    admin.reset()
    assert admin.events()["events"] == []
    stats = admin.stats()
    assert stats["requests_total"] == 0 and stats["loads"] == 0
    assert admin.faults()["crash_after_tokens"] is None
    assert client.ps().models == []


def test_events_long_poll_and_correlate_requests(http, sim, admin) -> None:
    start = admin.events()["next"]
    result: dict = {}

    def poll() -> None:
        result.update(admin.events(start, wait_s=10))

    poller = threading.Thread(target=poll)
    poller.start()
    http.post(f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False})
    poller.join(15)
    assert result["events"] and result["next"] > start
    page = admin.events(start)
    kinds = [e["type"] for e in page["events"]]
    assert kinds[:5] == ["request", "load", "loaded", "first_token", "done"]
    request = page["events"][0]
    assert request["path"] == "/api/generate" and request["peer_port"] > 0
    ids = {e.get("request_id") for e in page["events"] if e["type"] != "loaded"}
    assert ids == {request["request_id"]}
    assert [e["seq"] for e in page["events"]] == sorted(e["seq"] for e in page["events"])
    assert admin.events(page["next"], wait_s=0.1) == {"events": [], "next": page["next"]}


def test_run_time_config(admin, client) -> None:
    try:
        config = admin.config(
            num_parallel=3, keep_alive="2m", models={"llama3.2": {"tokens_per_s": 0}}
        )
        assert config["num_parallel"] == 3 and config["keep_alive"] == 120
        client.generate(model="llama3.2", prompt="")
        assert admin.stats()["models"]["llama3.2:latest"]["slots"] == 3
        bad = admin.http.put(f"{admin.url}/_sim/config", json={"seed": 3})
        assert bad.status_code == 400
    finally:
        admin.config(num_parallel=1, keep_alive="5m")


def test_admin_requests_are_not_counted(admin, http, sim) -> None:
    http.get(f"{sim.url}/api/tags")
    admin.stats()
    admin.faults()
    stats = admin.stats()
    assert stats["requests"] == {"GET /api/tags": 1}
    assert stats["responses_by_status"] == {"200": 1}
