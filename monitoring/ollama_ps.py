"""Which models each Ollama host has loaded (``GET /api/ps``), polled in the background.

A scrape must never wait on a slow or dead Ollama host, so a daemon thread asks every host
(found in the worker announcements) every few seconds, in parallel, with a short timeout, and
the collector reads the latest answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from workers.ollama_ps import HostState, fetch_all

__all__ = ["HostState", "PsPoller"]


class PsPoller:
    """A daemon thread keeping the latest /api/ps answer of every host ``hosts()`` names."""

    def __init__(
        self, hosts: Callable[[], list[str]], every_s: float = 5.0, timeout_s: float = 2.0
    ) -> None:
        self._hosts = hosts
        self.every_s = every_s
        self.timeout_s = timeout_s
        self._states: dict[str, HostState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ollama-ps", daemon=True)

    def start(self) -> PsPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def states(self) -> list[HostState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: s.host)

    def poll_once(self) -> None:
        try:
            hosts = self._hosts()
        except Exception:  # noqa: BLE001 - the host list comes from Redis; try again next round
            return
        states = fetch_all(hosts, self.timeout_s)
        with self._lock:
            self._states = {s.host: s for s in states}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.every_s)
