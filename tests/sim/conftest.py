"""Fixtures: a simulator in a background thread, the official client, and an admin helper."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import pytest
import requests
from sim_support import fast_models

from ollama_sim import SimConfig, SimulatorThread, serve_in_thread


class Admin:
    """A small client for the ``/_sim/`` control API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def close(self) -> None:
        self.http.close()

    def stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.url}/_sim/stats", timeout=10).json()

    def reset(self) -> None:
        self.http.post(f"{self.url}/_sim/reset", timeout=10).raise_for_status()

    def faults(self, method: str = "GET", body: Any = None) -> dict[str, Any]:
        response = self.http.request(method, f"{self.url}/_sim/faults", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        return self.faults("PUT", fields)

    def config(self, **fields: Any) -> dict[str, Any]:
        response = self.http.put(f"{self.url}/_sim/config", json=fields, timeout=10)
        response.raise_for_status()
        return response.json()

    def events(self, since: int = 0, wait_s: float = 0.0) -> dict[str, Any]:
        response = self.http.get(
            f"{self.url}/_sim/events", params={"since": since, "wait": wait_s}, timeout=wait_s + 10
        )
        return response.json()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0, since: int = 0
    ) -> dict[str, Any]:
        """Block until an event matching ``predicate`` is logged; return it."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for a simulator event")
            page = self.events(since, min(remaining, 5.0))
            for event in page["events"]:
                if predicate(event):
                    return event
            since = page["next"]

    def wait_stats(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Block until the stats satisfy ``predicate``, re-reading after each new event."""
        deadline = time.monotonic() + timeout_s
        since = self.events()["next"]
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"stats never matched: {stats}")
            since = self.events(since, min(remaining, 1.0))["next"]


@pytest.fixture(scope="session")
def shared_sim() -> Iterator[SimulatorThread]:
    sim = serve_in_thread(SimConfig(models=fast_models(), no_delay=False))
    yield sim
    sim.stop()


@pytest.fixture
def sim(shared_sim: SimulatorThread) -> Iterator[SimulatorThread]:
    """A zero-delay simulator, reset before each test."""
    admin = Admin(shared_sim.url)
    admin.reset()
    admin.close()
    yield shared_sim


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimulatorThread]]:
    """Start a dedicated simulator with custom settings; stopped after the test."""
    started: list[SimulatorThread] = []

    def start(**settings: Any) -> SimulatorThread:
        settings.setdefault("models", fast_models())
        instance = serve_in_thread(SimConfig(**settings))
        started.append(instance)
        return instance

    yield start
    for instance in started:
        instance.stop()


@pytest.fixture
def admin(sim: SimulatorThread) -> Iterator[Admin]:
    helper = Admin(sim.url)
    yield helper
    helper.close()


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[ollama.Client]:
    with ollama.Client(host=sim.url) as instance:
        yield instance


@pytest.fixture
def http(sim: SimulatorThread) -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session
