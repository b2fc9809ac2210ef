"""The simulator's controls for embedding tests: its calls, its own answers, a slow first call."""

from __future__ import annotations

import time
from typing import Any

import requests

from producers.jobs import Job
from tasks.results import TaskResult
from tests.conftest import SimControl

MODEL = "nomic-embed-text"


class EmbedSim(SimControl):
    def configure(self, **config: Any) -> None:
        requests.put(f"{self.url}/_sim/config", json=config, timeout=10).raise_for_status()

    def embed_calls(self, since: int) -> list[dict[str, Any]]:
        """The ``embed`` events (one per call that computed vectors) after ``since``."""
        return [e for e in self.events(since)["events"] if e["type"] == "embed"]

    def clear_faults(self) -> None:
        requests.put(f"{self.url}/_sim/faults", json={}, timeout=10).raise_for_status()

    def mark(self) -> int:
        return int(self.events()["next"])

    def direct(self, texts: list[str], **extra: Any) -> dict[str, Any]:
        """What the simulator itself answers for these texts."""
        body = {"model": MODEL, "input": texts, **extra}
        reply: dict[str, Any] = requests.post(f"{self.url}/api/embed", json=body, timeout=30).json()
        return reply


def slow_first_call(sim: EmbedSim, load_s: float) -> None:
    """The next call loads the model for ``load_s``: what arrives meanwhile gathers."""
    sim.reset()  # unloads every model
    sim.configure(models={MODEL: {"load_s": load_s}})


def wait_running(jobs: list[Job], timeout_s: float) -> None:
    """Until every job's task is running (started by a worker)."""
    deadline = time.monotonic() + timeout_s
    while any(job.status() != "running" for job in jobs):
        assert time.monotonic() < deadline, "the tasks never all started"
        time.sleep(0.05)


def outcomes(jobs: list[Job], timeout_s: float) -> tuple[list[TaskResult], list[list[str]]]:
    """Each job's result, then the event types of its stream."""
    results = [job.result(timeout=timeout_s) for job in jobs]
    return results, [[e["type"] for e in job.stream(timeout=timeout_s)] for job in jobs]
