"""A bare Celery app, the baseline for corral's tasks: the same broker, pool, prefetch, acks and
task events, but none of corral's work (records, leases, stream relay, validation).

Workers load it with ``celery -A benchmarks.bare_celery worker``; the Redis URL and the HTTP
pool size come from ``BENCH_REDIS_URL`` and ``BENCH_HTTP_POOL``, read when Celery configures the
app, not at import. Producers build their own handle with :func:`make_app`.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import requests
from celery import Celery
from requests.adapters import HTTPAdapter

QUEUE = "bench.bare"
NOOP = "bench.noop"
HTTP = "bench.http"


def bare_config(redis_url: str) -> dict[str, Any]:
    """The delivery settings corral uses (tasks/app.py), minus corral's own bookkeeping."""
    return {
        "broker_url": redis_url,
        "result_backend": redis_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_default_queue": QUEUE,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }


def make_app(redis_url: str | None = None) -> Celery:
    app = Celery("bench-bare", set_as_current=False)
    if redis_url is not None:
        app.conf.update(bare_config(redis_url))
    else:
        # weak=False: the signal would otherwise drop this local function before it fires
        app.on_configure.connect(_configure_from_env, weak=False)

    app.task(name=NOOP)(noop)
    app.task(name=HTTP)(http_call)
    return app


def _configure_from_env(sender: Celery, **_: Any) -> None:
    sender.conf.update(bare_config(os.environ["BENCH_REDIS_URL"]))


def noop() -> None:
    """Does nothing: the round trip is Celery and Redis alone."""


_session: requests.Session | None = None
_session_lock = threading.Lock()


def _pooled_session() -> requests.Session:
    """One session per process with corral's pool settings (workers/ollama_client.py)."""
    global _session
    with _session_lock:
        if _session is None:
            session = requests.Session()
            session.trust_env = False
            size = int(os.environ.get("BENCH_HTTP_POOL", "4"))
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=size)
            session.mount("http://", adapter)
            _session = session
        return _session


def http_call(url: str, body: dict[str, Any]) -> str:
    """The call a corral task makes: POST with ``stream: true``, parse every NDJSON line, and
    read the body to its end, which keeps the connection for the next call."""
    text = []
    request = {**body, "stream": True}
    with _pooled_session().post(
        url,
        data=json.dumps(request).encode(),
        stream=True,
        timeout=(5, 300),
        headers={"Content-Type": "application/json", "Accept": "application/x-ndjson"},
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines(chunk_size=65536):
            if line:
                text.append(json.loads(line).get("response", ""))
    return "".join(text)


app = make_app()
