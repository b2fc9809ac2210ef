"""Redis outages and lost pops: nothing accepted is lost, every stream ends once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from producers import Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from producers.jobs import Job
from tasks.events import TERMINAL_TYPES
from tasks.settings import load_settings
from tests.redis_proxy import RedisProxy
from workers.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.slow
FAST = {
    "CORRAL_VISIBILITY_TIMEOUT_S": "3",
    "CORRAL_LEASE_TTL_S": "1.5",
    "CORRAL_RETRY_BACKOFF_S": "0.05",
}


def test_redis_restart_under_load(tmp_path) -> None:
    server = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=True).start()
    sim, sim_url = start_simulator(
        [
            "--tokens-per-second",
            "200",
            "--load-seconds",
            "0",
            "--first-token-seconds",
            "0",
            "--num-parallel",
            "2",
        ]
    )
    worker = start_worker(
        ["llama3.2"],
        redis_url=server.url,
        ollama_host=sim_url,
        slots=2,
        log_path=tmp_path / "worker.log",
        env=FAST,
    )
    client = Client(settings=load_settings(redis_url=server.url))
    try:
        jobs = [
            client.generate("llama3.2", f"task {i}", options={"num_predict": 100})
            for i in range(12)
        ]
        for event in jobs[0].stream(timeout=30):
            if event["type"] == "token":
                break
        server.kill()
        time.sleep(0.5)  # Redis stays down for a moment, as in a real restart
        server.start()
        late = client.generate("llama3.2", "after the restart", options={"num_predict": 5})
        for job in [*jobs, late]:
            result = job.result(timeout=90)
            assert result.metrics.eval_count in (100, 5)
            events = list(job.stream(timeout=30))
            assert sum(e["type"] in TERMINAL_TYPES for e in events) == 1
            assert [e["seq"] for e in events] == list(range(len(events)))
    finally:
        client.close()
        worker.stop()
        sim.stop()
        server.stop()


@dataclass
class StuckPop:
    """A task whose message a worker took through the proxy, just before Redis "died"."""

    proxy: RedisProxy
    worker: Child
    client: Client
    job: Job
    direct_url: str


@contextmanager
def stuck_pop(
    redis_server: EmbeddedRedis, sim_url: str, tmp_path: Path, db: int
) -> Iterator[StuckPop]:
    """Redis answers the worker's BRPOP, then drops every connection: the worker holds the
    message and keeps retrying to record it as unacked."""
    proxy = RedisProxy(redis_server.host, redis_server.port)
    direct_url = f"redis://{redis_server.host}:{redis_server.port}/{db}"
    worker = start_worker(
        ["llama3.2"],
        redis_url=f"{proxy.url}/{db}",
        ollama_host=sim_url,
        log_path=tmp_path / "worker.log",
        env=FAST,
    )
    client = Client(settings=load_settings(redis_url=direct_url))
    try:
        proxy.cut_after(rb"^\*2\r\n\$\d+\r\ncorral\.llama3\.2:latest\r\n")
        job = client.generate("llama3.2", "taken", options={"num_predict": 5})
        assert proxy.cut.wait(20), "the worker never took the message"
        assert proxy.dropped_event.wait(20), "the worker is not trying to record it"
        yield StuckPop(proxy, worker, client, job, direct_url)
        events = list(job.stream(timeout=30))
        assert sum(e["type"] in TERMINAL_TYPES for e in events) == 1
    finally:
        client.close()
        worker.stop()
        proxy.close()


def test_message_popped_just_before_redis_vanishes_is_kept(
    redis_server: EmbeddedRedis, sim_url: str, tmp_path: Path
) -> None:
    """kombu alone drops that message (AOF persisted the pop); corral's transport keeps it."""
    with stuck_pop(redis_server, sim_url, tmp_path, db=3) as stuck:
        stuck.proxy.restore()
        assert stuck.job.result(timeout=60).metrics.eval_count == 5


def test_message_of_a_worker_killed_between_pop_and_record_is_recovered(
    redis_server: EmbeddedRedis, sim_url: str, tmp_path: Path
) -> None:
    """The worker dies before recording the message as unacked: only the ledger knows the
    message existed. Another worker's sweep puts it back on its queue."""
    with stuck_pop(redis_server, sim_url, tmp_path, db=5) as stuck:
        stuck.worker.kill()  # the message now exists only in the ledger
        stuck.proxy.restore()
        rescuer = start_worker(
            ["llama3.2"],
            redis_url=stuck.direct_url,
            ollama_host=sim_url,
            log_path=tmp_path / "rescuer.log",
            env=FAST,
        )
        try:
            result = stuck.job.result(timeout=60)
            assert result.metrics.eval_count == 5
            assert result.worker == rescuer.node_name  # type: ignore[attr-defined]
        finally:
            rescuer.stop()
