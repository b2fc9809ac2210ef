"""Runners, slots, loads, eviction and keep_alive, observed through stats and events."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import ollama
import pytest
import requests
from sim_support import fast_models, wait_event, wait_stats


class RawStreams:
    """Generate requests on raw sockets, so a test can hold or drop each one at will."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.sockets: list[socket.socket] = []

    def open(self, body: dict) -> socket.socket:
        data = json.dumps(body).encode()
        connection = socket.create_connection(self.address, timeout=10)
        connection.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (len(data), data)
        )
        self.sockets.append(connection)
        return connection

    def close_all(self) -> None:
        for connection in self.sockets:
            connection.close()


@pytest.fixture
def raw() -> Iterator:
    """Make RawStreams for a simulator URL; every socket is closed after the test."""
    holder: list[RawStreams] = []

    def make(url: str) -> RawStreams:
        holder.append(RawStreams(url))
        return holder[-1]

    yield make
    for streams in holder:
        streams.close_all()


def put_faults(url: str, **faults) -> None:
    requests.put(f"{url}/_sim/faults", json=faults, timeout=10).raise_for_status()


def test_parallel_slots_and_disconnect_frees_a_slot(start_sim, raw) -> None:
    sim = start_sim(num_parallel=2)
    put_faults(sim.url, stall_seconds=60, stall_after_tokens=1)
    streams = raw(sim.url)
    first = streams.open({"model": "llama3.2", "prompt": "one"})
    streams.open({"model": "llama3.2", "prompt": "two"})
    streams.open({"model": "llama3.2", "prompt": "three"})
    model = wait_stats(
        sim.url,
        lambda s: (
            s["models"]["llama3.2:latest"]["waiting"] == 1
            and s["models"]["llama3.2:latest"]["busy_slots"] == 2
        ),
    )
    assert model["models"]["llama3.2:latest"]["slots"] == 2
    assert model["pending"] == 0 and model["in_flight"] == 3
    first.close()
    event = wait_event(sim.url, lambda e: e["type"] == "disconnect")
    assert event["stage"] == "generating"
    stats = wait_stats(sim.url, lambda s: s["models"]["llama3.2:latest"]["waiting"] == 0)
    assert stats["models"]["llama3.2:latest"]["busy_slots"] == 2
    assert stats["generations_started"] == 3
    streams.close_all()
    stats = wait_stats(sim.url, lambda s: s["client_disconnects"] == 3)
    assert stats["models"]["llama3.2:latest"]["busy_slots"] == 0
    assert stats["models"]["llama3.2:latest"]["all_slots_busy_seconds"] > 0
    assert stats["in_flight"] == 0


def test_slot_wait_counts_in_total_not_load_duration(start_sim) -> None:
    sim = start_sim(models=fast_models(load_s=0.2, tokens_per_s=50))
    with ollama.Client(host=sim.url) as client:
        cold = client.generate(model="llama3.2", prompt="warm up", options={"num_predict": 1})
        assert cold.load_duration >= 200_000_000
        results: dict[str, ollama.GenerateResponse] = {}

        def long_job() -> None:
            with ollama.Client(host=sim.url) as own:
                results["a"] = own.generate(
                    model="llama3.2", prompt="a", options={"num_predict": 15}
                )

        since = requests.get(f"{sim.url}/_sim/events", timeout=10).json()["next"]
        worker = threading.Thread(target=long_job)
        worker.start()
        wait_event(sim.url, lambda e: e["type"] == "first_token", since=since)
        second = client.generate(model="llama3.2", prompt="b", options={"num_predict": 2})
        worker.join(10)
    assert second.load_duration < 50_000_000
    assert second.total_duration - second.load_duration > 150_000_000
    assert results["a"].eval_count == 15 and results["a"].load_duration < 50_000_000


def test_eviction_prefers_the_idle_model_with_the_shortest_keep_alive(start_sim) -> None:
    sim = start_sim(max_loaded_models=2)
    with ollama.Client(host=sim.url) as client:
        client.generate(model="llama3.2", prompt="", keep_alive="10m")
        client.generate(model="llava:7b", prompt="", keep_alive="2m")
        client.generate(model="deepseek-r1:14b", prompt="")
        assert [m.model for m in client.ps().models] == ["llama3.2:latest", "deepseek-r1:14b"]
    evict = wait_event(sim.url, lambda e: e["type"] == "evict")
    assert evict["model"] == "llava:7b" and evict["for_model"] == "deepseek-r1:14b"
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=10).json()
    assert (stats["loads"], stats["unloads"], stats["evictions"]) == (3, 1, 1)


def test_busy_victim_is_drained_before_the_swap(start_sim, raw) -> None:
    sim = start_sim(max_loaded_models=1)
    put_faults(
        sim.url,
        fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "model": "llama3.2"}],
    )
    streams = raw(sim.url)
    holder = streams.open({"model": "llama3.2", "prompt": "hold"})
    wait_event(sim.url, lambda e: e["type"] == "first_token")
    done: list[str] = []

    def other() -> None:
        with ollama.Client(host=sim.url) as own:
            done.append(own.generate(model="llava:7b", prompt="next").done_reason)

    thread = threading.Thread(target=other)
    thread.start()
    evict = wait_event(sim.url, lambda e: e["type"] == "evict")
    assert evict["model"] == "llama3.2:latest" and evict["busy"] is True
    stats = wait_stats(sim.url, lambda s: s["pending"] == 1)
    assert stats["models"]["llava:7b"]["loaded"] is False
    holder.close()
    thread.join(10)
    assert done == ["stop"]
    events = requests.get(f"{sim.url}/_sim/events", timeout=10).json()["events"]
    order = [(e["type"], e.get("model")) for e in events if e["type"] in ("unload", "load")]
    assert order == [
        ("load", "llama3.2:latest"),
        ("unload", "llama3.2:latest"),
        ("load", "llava:7b"),
    ]


def test_runner_option_change_reloads_but_sampling_does_not(client, admin) -> None:
    client.generate(model="llama3.2", prompt="x", options={"num_ctx": 2048})
    client.generate(
        model="llama3.2",
        prompt="x",
        options={"num_ctx": 2048, "temperature": 0.1, "seed": 3, "num_predict": 5},
    )
    assert admin.stats()["loads"] == 1
    client.generate(model="llama3.2", prompt="x", options={"num_ctx": 8192})
    stats = admin.stats()
    assert (stats["loads"], stats["unloads"]) == (2, 1)
    assert stats["models"]["llama3.2:latest"]["loads"] == 2
    assert client.ps().models[0].context_length == 8192


def test_keep_alive_zero_unloads_after_the_request(client, admin) -> None:
    client.generate(model="llama3.2", prompt="x", keep_alive=0)
    assert client.ps().models == []
    assert admin.stats()["unloads"] == 1


def test_keep_alive_last_writer_wins(client) -> None:
    client.generate(model="llama3.2", prompt="", keep_alive=-1)
    assert client.ps().models[0].expires_at.year > 2300
    client.generate(model="llama3.2", prompt="x", keep_alive="1m")
    expires = client.ps().models[0].expires_at
    left = (expires - datetime.now(UTC)).total_seconds()
    assert 50 < left <= 60
    client.generate(model="llama3.2", prompt="x")  # absent: keeps the runner's 1m
    left = (client.ps().models[0].expires_at - datetime.now(UTC)).total_seconds()
    assert 50 < left <= 60


def test_idle_timer_starts_when_the_last_request_ends(client, admin) -> None:
    client.generate(model="llama3.2", prompt="x", keep_alive=0.3)
    unload = admin.wait_for(lambda e: e["type"] == "unload")
    done = admin.wait_for(lambda e: e["type"] == "done")
    assert unload["t"] - done["t"] >= 0.29
    assert client.ps().models == []


def test_default_keep_alive_comes_from_the_config(start_sim) -> None:
    sim = start_sim(keep_alive_s=120)
    with ollama.Client(host=sim.url) as client:
        client.generate(model="llama3.2", prompt="")
        left = (client.ps().models[0].expires_at - datetime.now(UTC)).total_seconds()
    assert 110 < left <= 120


def test_disconnect_while_queued_for_a_load(start_sim, raw) -> None:
    sim = start_sim(models=fast_models(load_s=30))
    streams = raw(sim.url)
    waiting = streams.open({"model": "llama3.2", "prompt": "x"})
    wait_event(sim.url, lambda e: e["type"] == "load")
    waiting.close()
    event = wait_event(sim.url, lambda e: e["type"] == "disconnect")
    assert event["stage"] == "queued" and event["model"] == "llama3.2:latest"
    assert wait_stats(sim.url, lambda s: s["in_flight"] == 0)["client_disconnects"] == 1


def test_embedding_models_use_one_slot(start_sim) -> None:
    sim = start_sim(num_parallel=4)
    with ollama.Client(host=sim.url) as client:
        client.embed(model="all-minilm", input="x")
        client.generate(model="llama3.2", prompt="")
    models = requests.get(f"{sim.url}/_sim/stats", timeout=10).json()["models"]
    assert models["all-minilm:latest"]["slots"] == 1
    assert models["llama3.2:latest"]["slots"] == 4


async def _stream_generate(address: tuple[str, int], index: int) -> list[dict]:
    reader, writer = await asyncio.open_connection(*address)
    body = json.dumps(
        {"model": "llama3.2", "prompt": f"client {index}", "options": {"num_predict": 10}}
    ).encode()
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    _, _, payload = data.partition(b"\r\n\r\n")
    lines = []
    while payload:
        size_text, _, rest = payload.partition(b"\r\n")
        size = int(size_text, 16)
        if size == 0:
            break
        lines.append(json.loads(rest[:size]))
        payload = rest[size + 2 :]
    return lines


def test_two_hundred_concurrent_streams(start_sim) -> None:
    sim = start_sim(num_parallel=200, models=fast_models(tokens_per_s=50))
    host, port = sim.url.removeprefix("http://").split(":")

    async def run_all() -> list[list[dict]]:
        return await asyncio.gather(*(_stream_generate((host, int(port)), i) for i in range(200)))

    results = asyncio.run(run_all())
    assert all(len(lines) == 11 and lines[-1]["done_reason"] == "length" for lines in results)
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=10).json()
    assert stats["generations_completed"] == 200 and stats["tokens_generated"] == 2000
    # 200 streams of 10 tokens at 50 tokens/s overlap: far less than 200 * 0.2 s of wall time
    assert stats["models"]["llama3.2:latest"]["busy_slot_seconds"] > 200 * 0.15
    assert stats["uptime_s"] < 20
