"""The Ollama client on its own: TLS, in-band errors, unreachable hosts, timeouts, aborts.

The client reports neutral :mod:`workers.ollama_errors`; how corral classifies them is
tests/test_contract.py's.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import trustme

from tests.conftest import SimControl
from workers.embedded_redis import free_port
from workers.ollama_client import (
    OllamaClient,
    OllamaConfig,
    RetryPolicy,
    StreamAbort,
    Timeouts,
    TLSConfig,
)
from workers.ollama_errors import (
    OllamaConnectError,
    OllamaResponseError,
    OllamaStopped,
    OllamaStreamError,
    OllamaTimeout,
    OllamaTLSError,
)

BODY = {"model": "llama3.2", "prompt": "hello", "options": {"num_predict": 4}}
FAST = RetryPolicy(transport_retries=2, backoff_s=0.01, backoff_max_s=0.05)


def read_text(
    client: OllamaClient, body: dict = BODY, abort: StreamAbort | None = None, *, via: str
) -> str:
    """A generation's text, read with ``stream`` (a generator in this thread) or ``relay``
    (chunks after the first from the process's body pump)."""
    if via == "stream":
        chunks = client.stream("/api/generate", body, abort=abort)
        return "".join(chunk.get("response", "") for chunk in chunks)
    parts: list[str] = []
    client.relay("/api/generate", body, lambda c: parts.append(c.get("response", "")), abort=abort)
    return "".join(parts)


@pytest.fixture(params=["stream", "relay"])
def text_of(request: pytest.FixtureRequest) -> Callable[..., str]:
    """:func:`read_text` through either reader: each test runs with both."""
    return partial(read_text, via=request.param)


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


def test_https_host_with_a_private_ca(
    tls_proxy: TLSProxy, ca: trustme.CA, tmp_path, sim, text_of: Callable[..., str]
) -> None:
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
    with pytest.raises(OllamaTLSError, match="TLS"):
        text_of(untrusted)
    trusted.close()
    untrusted.close()


def test_error_status_and_legacy_in_band_errors(
    sim_url: str, sim, text_of: Callable[..., str]
) -> None:
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(legacy_errors=True, fail_next=[{"type": "status", "status": 500}])
    with pytest.raises(OllamaResponseError) as info:  # HTTP 200 plus one error line
        text_of(client)
    assert info.value.status == 200 and not info.value.mid_stream
    assert "runner" in (info.value.body or "")
    assert text_of(client)  # the next request is served
    with pytest.raises(OllamaResponseError) as info:
        text_of(client, {**BODY, "model": "ghost-model"})
    assert info.value.status == 404 and info.value.body == "model 'ghost-model' not found"
    client.close()


def test_unreachable_host_is_retried_then_reported(text_of: Callable[..., str]) -> None:
    with socket.socket() as probe:  # a port that refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OllamaClient(OllamaConfig(host=f"http://127.0.0.1:{port}", retry=FAST))
    with pytest.raises(OllamaConnectError, match="cannot reach Ollama") as info:
        text_of(client)
    assert info.value.status is None
    client.close()


def test_error_line_mid_stream_has_no_status(
    sim_url: str, sim, text_of: Callable[..., str]
) -> None:
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(fail_next=[{"type": "crash_after", "tokens": 2}])
    with pytest.raises(OllamaResponseError) as info:
        text_of(client, {**BODY, "options": {"num_predict": 10}})
    assert info.value.mid_stream and "runner" in (info.value.body or "")
    client.close()


class CannedServer:
    """Answers every request on a loopback port with the same raw bytes, then closes."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                if _read_request(conn):
                    conn.sendall(self._answer)

    def close(self) -> None:
        self._listener.close()


def _read_request(conn: socket.socket) -> bool:
    """Read a whole request, its body too: a socket closed with unread bytes sends a reset,
    which can reach the client before it has read the answer. False if the peer went away."""
    request = b""
    while b"\r\n\r\n" not in request:
        if not (data := conn.recv(65536)):
            return False
        request += data
    head, _, body = request.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        if not (data := conn.recv(65536)):
            return False
        body += data
    return True


def chunked(*lines: bytes, end: bool = True) -> bytes:
    # Connection: close, as the canned server closes after each answer: a client that pooled
    # the connection could send its next request into the close and get a reset.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines)
    return head + body + (b"0\r\n\r\n" if end else b"")


TOKEN = b'{"response":"hi","done":false}\n'


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (chunked(TOKEN), "ended without a final 'done'"),
        (chunked(TOKEN, b"not json\n"), "not JSON"),
        (chunked(TOKEN, b"[1, 2]\n"), "not a JSON object"),
        (chunked(TOKEN, end=False) + b"ff\r\ncut", "broke"),
    ],
)
def test_a_stream_that_breaks_or_ends_without_done(
    answer: bytes, match: str, text_of: Callable[..., str]
) -> None:
    server = CannedServer(answer)
    client = OllamaClient(OllamaConfig(host=server.url, retry=FAST))
    with pytest.raises(OllamaStreamError, match=match) as info:
        text_of(client)
    assert info.value.status is None
    client.close()
    server.close()


def test_timeouts_say_which_wait_ran_out(
    sim_url: str, sim: SimControl, text_of: Callable[..., str]
) -> None:
    timeouts = Timeouts(connect_s=5, first_byte_s=0.3, stall_s=0.3)
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST, timeouts=timeouts))
    sim.faults(first_byte_delay_seconds=3)
    with pytest.raises(OllamaTimeout) as info:
        text_of(client)
    assert info.value.phase == "first_byte"
    sim.reset()
    sim.faults(fail_next=[{"type": "stall", "seconds": 3, "after_tokens": 2}])
    with pytest.raises(OllamaTimeout) as info:
        text_of(client, {**BODY, "options": {"num_predict": 10}})
    assert info.value.phase == "stall"
    client.close()


def stream_in_thread(
    client: OllamaClient, abort: StreamAbort, text_of: Callable[..., str], body: dict = BODY
) -> dict:
    """Run one stream in a thread; the returned dict gets its error and when it ended."""
    outcome: dict = {}

    def run() -> None:
        try:
            text_of(client, body, abort=abort)
        except Exception as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.mark.timeout(20)
def test_abort_before_the_first_byte_closes_the_connection(
    sim_url: str, sim: SimControl, text_of: Callable[..., str]
) -> None:
    """Ollama loads a model or queues the request: nothing has come back yet."""
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(first_byte_delay_seconds=30)
    since = sim.events()["next"]
    abort = StreamAbort()
    outcome = stream_in_thread(client, abort, text_of)
    sim.wait_for_event("request", timeout_s=10, since=since)
    fired = time.monotonic()
    abort.fire()
    outcome["thread"].join(5)
    assert isinstance(outcome.get("error"), OllamaStopped)
    assert outcome["ended"] - fired < 1.0
    # Still loading its model (queued) or in its first-byte delay (generating): both before any
    # byte, and which one depends on how fast the model loads after the reset.
    stage = sim.wait_for_event("disconnect", timeout_s=5, since=since)["stage"]
    assert stage in ("queued", "generating")
    client.close()


@pytest.mark.timeout(20)
def test_abort_cuts_a_retry_backoff_short(
    sim_url: str, sim: SimControl, text_of: Callable[..., str]
) -> None:
    """Ollama answers 503 (its queue is full); the transport backs off before retrying."""
    patient = RetryPolicy(transport_retries=2, backoff_s=20, backoff_max_s=20)
    client = OllamaClient(OllamaConfig(host=sim_url, retry=patient))
    sim.faults(fail_next=[{"type": "status", "status": 503}] * 3)
    since = sim.events()["next"]
    abort = StreamAbort()
    outcome = stream_in_thread(client, abort, text_of)
    sim.wait_for_event("error", timeout_s=10, since=since)  # the first 503 went out
    fired = time.monotonic()
    abort.fire()
    outcome["thread"].join(5)
    assert isinstance(outcome.get("error"), OllamaStopped)
    assert outcome["ended"] - fired < 1.0
    client.close()


def test_a_stream_read_to_its_end_leaves_its_connection_to_the_next(
    sim_url: str, sim: SimControl, text_of: Callable[..., str]
) -> None:
    """Ollama ends the body right after the last chunk: the next request reuses the
    connection, and an abort fired once the stream ended cannot shut it under that request."""
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    since = sim.events()["next"]
    abort = StreamAbort()
    first = text_of(client, abort=abort)
    abort.fire()  # the task is cancelled just after its stream ended
    assert text_of(client) == first and text_of(client) == first
    requests = [e for e in sim.events(since)["events"] if e["type"] == "request"]
    assert len(requests) == 3 and len({e["peer_port"] for e in requests}) == 1
    client.close()


@pytest.mark.timeout(20)
def test_abort_mid_stream_closes_the_connection(
    sim_url: str, sim: SimControl, text_of: Callable[..., str]
) -> None:
    """Ollama is generating (stalled after two tokens, so the stream cannot end first)."""
    client = OllamaClient(OllamaConfig(host=sim_url, retry=FAST))
    sim.faults(fail_next=[{"type": "stall", "seconds": 30, "after_tokens": 2}])
    since = sim.events()["next"]
    abort = StreamAbort()
    body = {**BODY, "options": {"num_predict": 10}}
    outcome = stream_in_thread(client, abort, text_of, body)
    sim.wait_for_event("first_token", timeout_s=10, since=since)
    fired = time.monotonic()
    abort.fire()
    outcome["thread"].join(5)
    assert isinstance(outcome.get("error"), OllamaStopped)
    assert outcome["ended"] - fired < 1.0
    assert sim.wait_for_event("disconnect", timeout_s=5, since=since)["stage"] == "generating"
    client.close()


def test_lines_split_across_chunks_and_reads() -> None:
    """NDJSON framing owes nothing to the chunks: a line may span several, and several may
    share one; chunk extensions and a trailer are allowed."""
    lines = [b'{"response":"a","done":false}', b'{"response":"b","done":false}']
    final = b'{"response":"","done":true}'
    text = b"\n".join([*lines, final]) + b"\n"
    pieces = [text[:7], text[7:40], text[40:]]
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces)
    answer = chunked().replace(b"0\r\n\r\n", b"") + body + b"0\r\nX-Trailer: 1\r\n\r\n"
    server = CannedServer(answer)
    client = OllamaClient(OllamaConfig(host=server.url, retry=FAST))
    for via in ("stream", "relay"):
        assert read_text(client, via=via) == "ab"
    client.close()
    server.close()


DONE = b'{"response":"","done":true,"done_reason":"stop"}\n'


def test_a_relay_pauses_only_when_the_rest_of_the_answer_is_not_there_yet() -> None:
    """An answer sent whole is read to its end by the calling thread without a pause (so what
    its chunks held back goes out with the end); one whose rest comes later gets a pause, in
    the calling thread, before the relay waits for it."""
    whole = CannedServer(chunked(TOKEN, TOKEN, TOKEN, DONE))
    client = OllamaClient(OllamaConfig(host=whole.url, retry=FAST))
    caller, seen = threading.get_ident(), []
    client.relay(
        "/api/generate",
        BODY,
        lambda c: seen.append(("chunk", c["done"], threading.get_ident() == caller)),
        on_pause=lambda: seen.append(("pause", None, threading.get_ident() == caller)),
    )
    assert seen == [("chunk", False, True)] * 3 + [("chunk", True, True)]
    client.close()
    whole.close()

    answer = chunked(TOKEN, TOKEN, DONE)
    first, rest = answer.split(TOKEN, 1)
    paused = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            _read_request(conn)
            conn.sendall(first + TOKEN)
            paused.wait(5)  # the rest only once the relay said it waits for it
            conn.sendall(rest)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = OllamaClient(OllamaConfig(host=f"http://127.0.0.1:{listener.getsockname()[1]}"))
    events: list[str] = []

    def pause() -> None:
        assert threading.get_ident() == caller
        events.append("pause")
        paused.set()

    client.relay("/api/generate", BODY, lambda c: events.append("chunk"), on_pause=pause)
    assert events[:2] == ["chunk", "pause"] and events[2:] == ["chunk", "chunk"]
    server.join(5)
    client.close()
    listener.close()
