"""A small HTTP receiver for webhook tests: records each POST, answers as each path is told."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks specification's example
# What a worker or a producer needs to sign deliveries to, and accept callbacks on, 127.0.0.1.
WEBHOOK_ENV = {"CORRAL_WEBHOOK_SECRET": SECRET, "CORRAL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() on arrival

    def verified(self, secret: str = SECRET) -> dict:
        """The payload, once standardwebhooks verified the signature (raises if not)."""
        return standardwebhooks.Webhook(secret).verify(self.body, self.headers)


@dataclass
class Receiver:
    """``statuses[path]``: answers to give in turn (the last one repeats; default 200).
    ``hold[path]``: an event the handler waits on (at most 30 s) before answering."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    cond: threading.Condition = field(default_factory=threading.Condition)
    arrived: dict[str, int] = field(default_factory=dict)  # requests that arrived, held or not

    def on(self, path: str) -> list[Received]:
        with self.cond:
            return [r for r in self.received if r.path == path]

    def wait(self, path: str, count: int = 1, timeout_s: float = 30.0) -> list[Received]:
        """Wait until ``count`` requests to ``path`` were answered (or their sender died)."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while len([r for r in self.received if r.path == path]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} deliveries to {path}: not in {timeout_s} s")
                self.cond.wait(left)
            return [r for r in self.received if r.path == path]

    def wait_arrived(self, path: str, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while self.arrived.get(path, 0) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{count} requests to {path} did not arrive")
                self.cond.wait(left)

    def answer(self, path: str) -> int:
        with self.cond:
            answers = self.statuses.get(path, [200])
            return answers.pop(0) if len(answers) > 1 else answers[0]


def serve() -> tuple[Receiver, ThreadingHTTPServer]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            at = time.time()
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with receiver.cond:
                receiver.arrived[self.path] = receiver.arrived.get(self.path, 0) + 1
                receiver.cond.notify_all()
            held = receiver.hold.get(self.path)
            if held is not None:
                held.wait(30)
            status = receiver.answer(self.path)
            try:
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass  # the sender is gone (a killed worker): its request still came
            with receiver.cond:
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.received.append(Received(self.path, headers, body, at))
                receiver.cond.notify_all()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="receiver", daemon=True).start()
    return receiver, server


@pytest.fixture(scope="module", name="receiver")
def receiver_fixture() -> Iterator[Receiver]:
    """One receiver for a test module (import it there): each test posts to its own path."""
    found, server = serve()
    yield found
    server.shutdown()
    server.server_close()
