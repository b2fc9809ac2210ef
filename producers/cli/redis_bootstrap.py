"""Find the Redis to use, starting an embedded one when the configured loopback URL is down."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from tasks.errors import BrokerUnavailable
from workers.embedded_redis import is_reachable, redis_server_binary

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def state_dir() -> Path:
    return Path.home() / ".local" / "state" / "ollama-corral"


def ensure_redis(url: str, *, quiet: bool = False) -> str:
    """Return ``url`` once Redis answers there.

    If nothing answers and the URL is on loopback, start a persistent (AOF) redis-server on that
    port as a background daemon shared by later commands; otherwise say what to do.
    """
    if is_reachable(url):
        return url
    parts = urlsplit(url)
    if parts.scheme != "redis" or (parts.hostname or "") not in LOOPBACK:
        raise BrokerUnavailable(
            f"Redis at {url} does not answer; start it, or unset CORRAL_REDIS_URL to use an "
            "embedded redis-server"
        )
    port = parts.port or 6379
    data = state_dir() / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            parts.hostname or "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "yes",
            "--pidfile",
            str(data / "redis.pid"),
            "--logfile",
            str(data / "redis.log"),
        ],  # fmt: skip
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if is_reachable(url, 0.2):
            if not quiet:
                print(
                    f"corral: no Redis answered at {url}; started an embedded redis-server "
                    f"(data in {data}; stop it with `kill $(cat {data / 'redis.pid'})`)",
                    file=sys.stderr,
                )
            return url
        time.sleep(0.05)
    raise BrokerUnavailable(f"the embedded redis-server did not start; see {data / 'redis.log'}")
