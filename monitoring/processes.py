"""Start Flower or the exporter as a child process and wait until it answers.

For a local stack and the tests; in production they run as services (docker-compose.yml).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from workers.embedded_redis import free_port
from workers.processes import Child


class Background(Child):
    """A child process serving HTTP at ``url``; :meth:`stop` ends it (SIGTERM, then SIGKILL)."""

    def __init__(
        self, process: subprocess.Popen[Any], url: str, log_path: Path | None = None
    ) -> None:
        super().__init__(process, log_path)
        self.url = url


def _spawn(
    argv: Sequence[str], redis_url: str, env: dict[str, str] | None, log_path: Path | None
) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, **(env or {}), "CORRAL_REDIS_URL": redis_url}
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", *argv],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]


def _wait_http(child: Background, path: str, timeout_s: float) -> Background:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.url} exited at start:\n{child.log_tail()}")
        try:
            if requests.get(child.url + path, timeout=1).status_code < 500:
                return child
        except requests.ConnectionError:
            time.sleep(0.05)  # not listening yet
    child.stop()
    raise TimeoutError(f"{child.url}{path} did not answer in {timeout_s} s:\n{child.log_tail()}")


def start_flower(
    redis_url: str,
    *,
    basic_auth: str | None = None,
    port: int | None = None,
    extra: Sequence[str] = (),
    log_path: Path | None = None,
    timeout_s: float = 30.0,
) -> Background:
    """``python -m monitoring.flower`` (on 127.0.0.1, its default); returns once /healthcheck
    answers."""
    port = port or free_port()
    argv = ["monitoring.flower", f"--port={port}", *extra]
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    process = _spawn(argv, redis_url, None, log_path)
    return _wait_http(
        Background(process, f"http://127.0.0.1:{port}", log_path), "/healthcheck", timeout_s
    )


def start_exporter(
    redis_url: str,
    *,
    extra: Sequence[str] = (),
    log_path: Path | None = None,
    timeout_s: float = 30.0,
) -> Background:
    """``python -m monitoring.exporter --port 0``; returns once it printed its URL."""
    argv = [sys.executable, "-m", "monitoring.exporter", "--host", "127.0.0.1", "--port", "0"]
    argv += extra
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
    )
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline().decode()
        if not line:
            break
        if match := re.search(r"(http://\S+)/metrics", line):
            return Background(process, match.group(1))
    Background(process, "").stop()
    raise RuntimeError("the exporter did not print its URL")
