"""POST a webhook body with a short timeout, to a peer the caller's policy allows.

The policy sees the address the socket actually connected to, not an earlier DNS answer, so a
host that resolves to a public address at submission and to a private one later is refused at
the connection itself. No redirects are followed and no proxy from the environment is used.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

PeerPolicy = Callable[[str, str], bool]  # (host in the URL, connected address) → allowed
BODY_KEPT = 200  # characters of a refusal's body kept for the record


class RefusedPeer(OSError):
    """The URL's host connected to an address the policy forbids."""


class _Checked:
    peer_policy: PeerPolicy

    def _check(self, sock: socket.socket, host: str) -> socket.socket:
        address = str(sock.getpeername()[0])
        if not self.peer_policy(host, address):
            sock.close()
            raise RefusedPeer(f"{host} resolved to {address}, which is not an allowed address")
        return sock


class _HTTP(_Checked, HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return self._check(super()._new_conn(), self.host)


class _HTTPS(_Checked, HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return self._check(super()._new_conn(), self.host)


@dataclass(frozen=True)
class Answer:
    """What the receiver answered (status 0: no answer at all; ``error`` says why)."""

    status: int
    detail: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class WebhookPoster:
    """Thread-safe; one per process. Pools connections per receiver."""

    def __init__(self, peer_policy: PeerPolicy, timeout_s: float, pool_size: int = 4) -> None:
        http = type(
            "CheckedHTTP",
            (HTTPConnectionPool,),
            {"ConnectionCls": type("Conn", (_HTTP,), {"peer_policy": staticmethod(peer_policy)})},
        )
        https = type(
            "CheckedHTTPS",
            (HTTPSConnectionPool,),
            {"ConnectionCls": type("Conn", (_HTTPS,), {"peer_policy": staticmethod(peer_policy)})},
        )
        self._pool = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False)
        self._pool.pool_classes_by_scheme = {"http": http, "https": https}
        self._timeout = urllib3.Timeout(connect=timeout_s, read=timeout_s)

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """One attempt; never raises for what the network or the receiver did."""
        try:
            response: Any = self._pool.request(
                "POST",
                url,
                body=body,
                headers=dict(headers),
                timeout=self._timeout,
                retries=False,
                redirect=False,
                preload_content=False,
            )
        except RefusedPeer as exc:
            return Answer(0, f"refused: {exc}")
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            return Answer(0, f"{type(exc).__name__}: {exc}")
        try:
            text = response.read(BODY_KEPT, decode_content=False).decode("utf-8", "replace")
        except (urllib3.exceptions.HTTPError, OSError):
            text = ""
        finally:
            response.release_conn()
        return Answer(response.status, f"HTTP {response.status}: {text}".strip())
