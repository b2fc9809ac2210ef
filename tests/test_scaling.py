"""Horizontal scaling: two workers, each with its own Ollama, share one model queue.

Each task runs exactly once and the load spreads over both hosts; ``corral status`` shows it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from producers import Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from producers.cli.ops import status

MODEL = "qwen2.5-coder:7b"  # in the simulator's catalogue, served by no other test's worker
TASKS = 12
# Each generation takes ~0.1 s, so a busy worker leaves the next message to the idle one.
SIM_ARGS = ["--load-seconds", "0", "--first-token-seconds", "0.05", "--tokens-per-second", "200"]


@pytest.fixture(scope="module")
def two_hosts(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    logs = Path(tmp_path_factory.mktemp("scaling"))
    sims: list[Child] = []
    workers: list[Child] = []
    urls: list[str] = []
    try:
        for name in ("gpu-a", "gpu-b"):
            sim, url = start_simulator(SIM_ARGS)
            sims.append(sim)
            urls.append(url)
            workers.append(
                start_worker(
                    [MODEL],
                    redis_url=redis_url,
                    ollama_host=url,
                    slots=1,
                    name=f"qwen2.5-coder-7b@{name}",
                    log_path=logs / f"{name}.log",
                )
            )
        yield urls
    finally:
        for child in workers + sims:
            child.stop()


def test_each_task_runs_once_and_the_load_spreads(two_hosts: list[str], client: Client) -> None:
    jobs = [client.generate(MODEL, f"Task {i}", options={"num_predict": 10}) for i in range(TASKS)]
    results = [job.result(timeout=60) for job in jobs]
    assert {r.task_id for r in results} == {j.id for j in jobs}
    served = Counter(r.ollama_host for r in results)
    assert set(served) == set(two_hosts), served
    assert min(served.values()) >= 2, served  # both hosts took a real share
    started = {
        url: requests.get(f"{url}/_sim/stats", timeout=10).json()["generations_started"]
        for url in two_hosts
    }
    assert started == dict(served)  # no task reached Ollama twice
    assert sum(started.values()) == TASKS


def test_status_shows_both_workers_and_their_hosts(two_hosts: list[str], redis_url: str) -> None:
    env = {"CORRAL_REDIS_URL": redis_url}
    data = json.loads(
        CliRunner().invoke(status, ["--json"], env=env, catch_exceptions=False).output
    )
    queue = next(q for q in data["queues"] if q["model"] == MODEL)
    assert (queue["workers"], queue["slots"]) == (2, 2)
    nodes = {w["node"]: w["ollama_host"] for w in data["workers"] if w["node"].startswith("qwen")}
    assert sorted(nodes.values()) == sorted(two_hosts)
    hosts = {h["host"]: h for h in data["ollama_hosts"]}
    for url in two_hosts:
        assert hosts[url]["up"] and MODEL in [m["model"] for m in hosts[url]["loaded"]]

    screen = CliRunner().invoke(status, [], env=env, catch_exceptions=False).output
    sections = [
        line for line in screen.splitlines() if line in ("QUEUES", "WORKERS", "OLLAMA HOSTS")
    ]
    assert sections == ["QUEUES", "WORKERS", "OLLAMA HOSTS"]
    assert "qwen2.5-coder-7b@gpu-a" in screen and "qwen2.5-coder-7b@gpu-b" in screen
    assert f"corral.{MODEL}" in screen and all(url in screen for url in two_hosts)
