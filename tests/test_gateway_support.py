"""Fixtures and helpers shared by the gateway tests: a real uvicorn server in a thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import uvicorn

from producers.gateway import GatewayConfig, create_app
from tasks.settings import Settings, load_settings
from workers.embedded_redis import free_port


class GatewayServer:
    """``create_app(...)`` served by uvicorn on a free loopback port, in a daemon thread."""

    def __init__(
        self, settings: Settings, config: GatewayConfig | None = None, *, require_auth: bool = False
    ) -> None:
        app = create_app(settings, config or GatewayConfig(), require_auth=require_auth)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    def __enter__(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="session", name="gateway_url")
def gateway_url_fixture(settings: Settings, worker: Any) -> Iterator[str]:
    """One gateway for the session, in front of the session's Redis and worker."""
    with GatewayServer(settings) as server:
        yield server.url


def settings_on_db(redis_url: str, db: int) -> Settings:
    """The same Redis, another database: keys and limits there do not reach other tests."""
    base = redis_url.rsplit("/", 1)[0]
    return load_settings(redis_url=f"{base}/{db}")


def read_sse(response: requests.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Parse an SSE body into ``{"id", "event", "data"}`` dicts (comments skipped)."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "":
            if current:
                events.append(current)
                current = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
            continue
        if raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        current[name] = json.loads(value) if name == "data" else value
    return events
