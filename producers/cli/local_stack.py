"""Run the parts on one machine as child processes: the simulator and workers.

Redis comes from :mod:`workers.embedded_redis`.

Used by ``corral demo``, the tests and the benchmarks. Every process is stopped by its handle.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import kombu.exceptions
import redis
import requests

from tasks.app import create_app
from tasks.keys import worker_key
from tasks.settings import load_settings
from workers.processes import Child

__all__ = ["Child", "ollama_answers", "start_simulator", "start_worker"]


def ollama_answers(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return requests.get(url.rstrip("/") + "/api/version", timeout=timeout_s).ok
    except requests.RequestException:
        return False


def start_simulator(args: Sequence[str] = (), timeout_s: float = 20.0) -> tuple[Child, str]:
    """``python -m ollama_sim --port 0 ARGS``; returns the child and the URL it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ollama_sim", "--host", "127.0.0.1", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    child = Child(process)
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = re.search(r"https?://[\w.\-\[\]:]+", line)
        if match:
            return child, match.group(0)
    child.stop()
    raise RuntimeError("the Ollama simulator did not print its URL")


def start_worker(
    models: Sequence[str],
    *,
    redis_url: str,
    ollama_host: str,
    slots: int = 1,
    pool: str = "threads",
    name: str | None = None,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    loglevel: str = "WARNING",
) -> Child:
    """``corral worker`` as a child process; returns once it answers a control ping."""
    argv = [
        sys.executable,
        "-m",
        "producers.cli",
        "worker",
        "--slots",
        str(slots),
        "--pool",
        pool,
        "--loglevel",
        loglevel,
    ]
    for model in models:
        argv += ["--model", model]
    node = name or f"{'+'.join(m.replace(':', '-') for m in models)}.{os.getpid()}@localhost"
    argv += ["--name", node]
    child_env = {
        **os.environ,
        **(env or {}),
        "CORRAL_REDIS_URL": redis_url,
        "OLLAMA_HOST": ollama_host,
    }
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        argv,
        env=child_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    if log_path:
        log.close()  # type: ignore[union-attr]
    child = Child(process, log_path)
    child.node_name = node  # type: ignore[attr-defined]
    try:
        wait_for_worker(redis_url, node, child, timeout_s)
    except BaseException:
        child.stop()  # never leave a half-started worker behind
        raise
    return child


def wait_for_worker(redis_url: str, node: str, child: Child, timeout_s: float) -> None:
    """Until the worker answers a ping and has announced itself (its models count as served,
    and the scheduler releases to it)."""
    settings = load_settings(redis_url=redis_url)  # rediss:// in its one verified form
    app = create_app(settings, main="corral-control")
    client = redis.Redis.from_url(settings.redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"worker {node} exited at start:\n{child.log_tail()}")
            try:
                if app.control.ping(destination=[node], timeout=0.5):
                    if client.exists(worker_key(node)):
                        return
                    time.sleep(0.05)
            except (OSError, redis.RedisError, kombu.exceptions.OperationalError):
                time.sleep(0.2)  # Redis is restarting
        child.stop()
        raise TimeoutError(f"worker {node} did not answer a ping in {timeout_s} s")
    finally:
        client.close()
        app.close()
