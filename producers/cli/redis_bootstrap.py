"""Find the Redis to use, starting an embedded one when the configured loopback URL is down."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.errors import BrokerUnavailable, InvalidSetting
from tasks.redis_url import masked
from workers.embedded_redis import Answer, EmbeddedRedis, is_loopback, probe

REDIS_URL = "CORRAL_REDIS_URL"


def state_dir() -> Path:
    return Path.home() / ".local" / "state" / "ollama-corral"


def ensure_redis(url: str, *, quiet: bool = False) -> str:
    """Return ``url`` once Redis answers there.

    If nothing listens there and the URL is a plain ``redis://`` one on loopback, start a
    persistent (AOF) redis-server on that port, with the URL's password, as a background
    process shared by later commands. Anything else that answers (a Redis refusing the
    password, a failed TLS handshake, something that is not Redis) is reported as such.
    """
    shown = masked(url)
    found = probe(url)
    if found.answer is Answer.UP:
        return url
    if found.answer is Answer.AUTH_FAILED:
        raise InvalidSetting(
            f"Redis at {shown} answered, but authentication failed ({found.reason}); fix the "
            f"user or password in {REDIS_URL}",
            field=REDIS_URL,
        )
    if found.answer is Answer.TLS_FAILED:
        raise InvalidSetting(
            f"the TLS handshake with Redis at {shown} failed ({found.reason}); check that the "
            f"port serves TLS and the certificate parameters in {REDIS_URL} (ssl_ca_certs, "
            "ssl_cert_reqs, ssl_certfile, ssl_keyfile)",
            field=REDIS_URL,
        )
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if found.answer is Answer.NOT_REDIS:
        raise InvalidSetting(
            f"something that is not Redis listens on {host}:{port} ({found.reason}); stop it, "
            f"or point {REDIS_URL} at another port",
            field=REDIS_URL,
        )
    if parts.scheme != "redis" or not is_loopback(host):
        raise BrokerUnavailable(
            f"Redis at {shown} does not answer ({found.reason}); start it, or unset {REDIS_URL} "
            "to use an embedded redis-server"
        )
    return _start_embedded(url, host, port, quiet=quiet)


def _start_embedded(url: str, host: str, port: int, *, quiet: bool) -> str:
    parts = urlsplit(url)
    data = state_dir() / f"redis-{port}"
    created = not data.exists()
    server = EmbeddedRedis(
        port,
        host=host,
        data_dir=data,
        appendonly=True,
        detach=True,  # it outlives this command, for the later ones and the workers
        password=unquote(parts.password) if parts.password is not None else None,
        username=unquote(parts.username) if parts.username else None,
    )
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:
        if created:  # leave nothing behind from a start that never was
            shutil.rmtree(data, ignore_errors=True)
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise BrokerUnavailable(
            f"the embedded redis-server on port {port} did not start ({last}); choose another "
            f"port in {REDIS_URL}, or start Redis yourself"
        ) from exc
    if not quiet:
        print(
            f"corral: no Redis answered at {masked(url)}; started an embedded redis-server "
            f"(data in {data}; stop it with `kill $(cat {server.pidfile})`)",
            file=sys.stderr,
        )
    return url
