"""Shared fixtures: a real Redis, the Ollama simulator, real Celery workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from producers.cli.local_stack import Child, start_simulator, start_worker
from producers.client import Client
from tasks.settings import Settings, load_settings
from workers.embedded_redis import EmbeddedRedis

DEFAULT_MODELS = (
    "llama3.2",
    "deepseek-r1:14b",
    "llava:7b",
    "all-minilm",
    "ghost-model",
)  # ghost: not in the simulator


@pytest.fixture(scope="session", autouse=True)
def _clean_environment() -> Iterator[None]:
    """The machine's own CORRAL_*/CELERY_*/OLLAMA_* settings must not leak into the tests."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("CORRAL_", "CELERY_", "OLLAMA_"))}
    for key in saved:
        del os.environ[key]
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


def flushed_db(server: EmbeddedRedis, db: int) -> Iterator[redis.Redis]:
    """A client of database ``db``, empty before and after (a test module's own database)."""
    client = redis.Redis.from_url(f"redis://{server.host}:{server.port}/{db}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    """One simulator for the session, without artificial delays."""
    child, url = start_simulator(["--no-delay"])
    yield url
    child.stop()


@pytest.fixture
def sim(sim_url: str) -> Iterator[SimControl]:
    control = SimControl(sim_url)
    control.reset()
    yield control
    control.reset()


class SimControl:
    """The simulator's admin API (/_sim/...)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        requests.post(f"{self.url}/_sim/reset", timeout=10).raise_for_status()

    def faults(self, **config: object) -> None:
        requests.post(f"{self.url}/_sim/faults", json=config, timeout=10).raise_for_status()

    def stats(self) -> dict:
        return requests.get(f"{self.url}/_sim/stats", timeout=10).json()

    def events(self, since: int = 0, wait_s: float = 0) -> dict:
        return requests.get(
            f"{self.url}/_sim/events", params={"since": since, "wait": wait_s}, timeout=wait_s + 10
        ).json()

    def wait_for_event(
        self, kind: str, timeout_s: float = 20.0, since: int = 0, **fields: object
    ) -> dict:
        """Block on the simulator's event log until an event of ``kind`` (with ``fields``)."""
        import time

        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            page = self.events(since, wait_s=min(left, 5.0))
            for event in page["events"]:
                if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                    return event
            since = page["next"]
        raise TimeoutError(f"no simulator event {kind!r} within {timeout_s} s")


@pytest.fixture(scope="session")
def settings(redis_url: str) -> Settings:
    return load_settings(redis_url=redis_url)


@pytest.fixture(scope="session")
def worker(
    redis_url: str, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    """A real `corral worker` process serving the default models, two slots."""
    log = Path(tmp_path_factory.mktemp("logs")) / "worker.log"
    child = start_worker(
        DEFAULT_MODELS,
        redis_url=redis_url,
        ollama_host=sim_url,
        slots=2,
        log_path=log,
        env=FAST_RETRIES,
    )
    yield child
    child.stop()


FAST_RETRIES = {
    "CORRAL_RETRY_BACKOFF_S": "0.05",
    "CORRAL_RETRY_BACKOFF_MAX_S": "0.2",
    # The session's simulator keeps three models loaded at once: tests of one model never wait
    # for another's to drain (model affinity, docs/scheduling.md).
    "CORRAL_MAX_LOADED_MODELS": "3",
}


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
def waiting_model(client: Client) -> Iterator[tuple[str, int]]:
    """A model with three tasks of tenant ``ops`` waiting and no live worker: one on its Celery
    queue, two held by the scheduler (its one-slot worker went away). Cleared afterwards."""
    from tasks.keys import MODELS_KEY, queue_name, worker_key
    from tasks.queues import sublists
    from tests.wire_support import announce_idle_worker

    model, depth = "waiting-probe:1b", 3
    gone = announce_idle_worker(client.redis, model, slots=1)
    jobs = [client.generate(model, f"waiting {n}", tenant="ops") for n in range(depth)]
    client.redis.delete(worker_key(gone.node))
    yield model, depth
    for job in jobs:
        job.cancel()
    with client.app.connection_for_write() as connection:
        connection.default_channel.queue_purge(queue_name(model))
    client.redis.delete(*sublists(queue_name(model)), f"_kombu.binding.{queue_name(model)}")
    client.redis.srem(MODELS_KEY, model)
