"""What a worker says in its log: missing models at start, and typed failures in one line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producers import Client, ModelNotFound
from producers.cli.local_stack import start_worker
from tests.conftest import FAST_RETRIES
from workers.embedded_redis import EmbeddedRedis, free_port

DB = 7  # away from the session's worker, which serves the same queues on db 0


def log_line(log: Path, needle: str, timeout_s: float = 30.0) -> str:
    """The first line of the worker's log containing ``needle``, once it is written."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the worker's log:\n{log.read_text()[-3000:]}")


@pytest.fixture
def db_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    yield f"redis://127.0.0.1:{redis_server.port}/{DB}"
    redis.Redis(port=redis_server.port, db=DB).flushdb()


def test_worker_warns_at_start_about_models_its_host_lacks_and_fails_them_in_one_line(
    db_url: str, sim_url: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    worker = start_worker(
        ["ghost-model", "llama3.2"],
        redis_url=db_url,
        ollama_host=sim_url,
        log_path=log,
        loglevel="INFO",
    )
    try:
        warning = log_line(log, "is not on the Ollama host")
        assert "WARNING" in warning and "model ghost-model:latest" in warning
        assert f"OLLAMA_HOST={sim_url} ollama pull ghost-model:latest" in warning
        with Client(db_url) as client, pytest.raises(ModelNotFound):
            client.generate("ghost-model", "hi").result(timeout=30)
        # Celery's own line about the failure: expected, so one line at INFO, no traceback
        assert "raised expected: ModelNotFound" in log_line(log, "] raised ")
    finally:
        worker.stop()
    text = log.read_text()
    assert "llama3.2:latest is not on" not in text
    assert "Traceback" not in text and "ERROR" not in text


def test_worker_says_when_it_cannot_check_its_models(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker = start_worker(
        ["llama3.2"],
        redis_url=db_url,
        ollama_host=down,
        log_path=log,
        env={**FAST_RETRIES, "CORRAL_HTTP_RETRIES": "0"},
    )
    try:
        warning = log_line(log, "cannot check the models")
        assert down in warning and "WARNING" in warning
    finally:
        worker.stop()
