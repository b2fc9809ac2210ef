"""The Ollama client on its own: TLS, legacy in-band errors, unreachable hosts, classification."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
import trustme

from tasks.errors import ModelNotFound, OllamaRequestError, OllamaRunnerError, OllamaUnavailable
from workers.embedded_redis import free_port
from workers.ollama_client import OllamaClient, OllamaConfig, RetryPolicy, TLSConfig

BODY = {"model": "llama3.2", "prompt": "hello", "options": {"num_predict": 4}}
FAST = RetryPolicy(transport_retries=2, backoff_s=0.01, backoff_max_s=0.05)


def text_of(client: OllamaClient, body: dict = BODY) -> str:
    return "".join(chunk.get("response", "") for chunk in client.stream("/api/generate", body))


class TLSProxy:
    """A TLS-terminating reverse proxy to the simulator, as one sits in front of real Ollama."""

    def __init__(self, target_port: int, server_context: ssl.SSLContext) -> None:
        self.port = free_port()
        self._target = target_port
        self._context = server_context
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TLSProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port, ssl=self._context)
        self._ready.set()
        await self._stop.wait()
        server.close()
        await server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_proxy(sim_url: str, ca: trustme.CA) -> Iterator[TLSProxy]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with TLSProxy(int(sim_url.rsplit(":", 1)[1]), context) as proxy:
        yield proxy


def test_https_host_with_a_private_ca(tls_proxy: TLSProxy, ca: trustme.CA, tmp_path, sim) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    trusted = OllamaClient(
        OllamaConfig(
            host=f"https://127.0.0.1:{tls_proxy.port}",
            tls=TLSConfig(ca_bundle=str(bundle)),
            retry=FAST,
        )
    )
    assert len(text_of(trusted).split()) >= 2
    untrusted = OllamaClient(OllamaConfig(host=f"https://127.0.0.1:{tls_proxy.port}", retry=FAST))
    with pytest.raises(OllamaRequestError, match="TLS"):
        text_of(untrusted)
    trusted.close()
    untrusted.close()


def test_legacy_in_band_errors_are_classified(sim_url: str, sim) -> None:
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(legacy_errors=True, fail_next=[{"type": "status", "status": 500}])
    with pytest.raises(OllamaRunnerError) as info:  # HTTP 200 plus one error line
        text_of(client)
    assert info.value.retryable and "runner" in info.value.message
    assert text_of(client)  # the next request is served
    with pytest.raises(ModelNotFound):
        text_of(client, {**BODY, "model": "ghost-model"})
    client.close()


def test_unreachable_host_is_retried_then_typed() -> None:
    with socket.socket() as probe:  # a port that refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OllamaClient(OllamaConfig(host=f"http://127.0.0.1:{port}", retry=FAST))
    with pytest.raises(OllamaUnavailable, match="cannot reach Ollama") as info:
        text_of(client)
    assert info.value.retryable
    client.close()


def test_stream_without_done_is_an_error(sim_url: str, sim) -> None:
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(fail_next=[{"type": "crash_after", "tokens": 2}])
    with pytest.raises(OllamaRunnerError) as info:
        text_of(client, {**BODY, "options": {"num_predict": 10}})
    assert info.value.status == -1
    client.close()
