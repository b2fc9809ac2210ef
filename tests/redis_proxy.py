"""A TCP proxy in front of Redis that can make Redis vanish at an exact moment.

``cut_after(pattern)`` arms it: the first reply from Redis that matches ``pattern`` is passed on
in full, and then every connection is closed and new ones are dropped at once, as if Redis had
died right after answering, until ``restore()``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading


class RedisProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # open pairs, cut when Redis "dies"
        self._every_socket: list[socket.socket] = []  # all ever made, closed by close()
        self._pattern: re.Pattern[bytes] | None = None
        self._down = False
        self._closed = False
        self.cut = threading.Event()  # the armed reply went through and Redis "died"
        self.dropped = 0  # connections refused while down
        self.dropped_event = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cut_after(self, pattern: bytes) -> None:
        with self._lock:
            self._pattern = re.compile(pattern)

    def restore(self) -> None:
        with self._lock:
            self._down = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._listener.close()
        self._close_all()
        with self._lock:
            every, self._every_socket = self._every_socket, []
        for sock in every:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                down = self._down
                self._every_socket.append(client)
            if down:
                self.dropped += 1
                self.dropped_event.set()
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            with self._lock:
                closed = self._closed
                self._every_socket.append(upstream)
                self._sockets |= {client, upstream}
            if closed:  # close() ran while this connection was being made
                client.close()
                upstream.close()
                return
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_redis: bool) -> None:
        reply = b""  # the armed reply, from its first byte, while it is still arriving
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                sink.sendall(chunk)
                if from_redis and not reply:
                    reply = self._match(chunk)
                elif reply:
                    reply += chunk
                if reply and _two_bulk_reply_complete(reply):
                    self._close_all()
                    self.cut.set()
                    return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def _match(self, chunk: bytes) -> bytes:
        with self._lock:
            found = self._pattern.search(chunk) if self._pattern else None
            if found is None:
                return b""
            self._pattern = None
            self._down = True
            return chunk[found.start() :]

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def _two_bulk_reply_complete(reply: bytes) -> bool:
    """Whether ``reply`` holds a whole ``*2`` array of two bulk strings (a BRPOP answer)."""
    position = reply.index(b"\r\n") + 2
    for _ in range(2):
        header_end = reply.find(b"\r\n", position)
        if header_end < 0:
            return False
        length = int(reply[position + 1 : header_end])
        position = header_end + 2 + length + 2
    return len(reply) >= position
