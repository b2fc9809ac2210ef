"""The simulator as an object: wiring, start/stop, and a background-thread runner for tests."""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType

from .admin import AdminApi
from .api import OllamaApi
from .config import SimConfig
from .faults import Faults
from .http import HttpServer, Request, Response
from .parts import SimParts
from .scheduler import Scheduler
from .stats import EventLog, Stats

log = logging.getLogger("ollama_sim")


class Simulator:
    """One simulated Ollama server. Create, ``await start()``, then ``await stop()``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = Stats()
        self.events = EventLog(self.config.event_buffer)
        self.faults = Faults(self.config.seed, self.config.faults)
        self.scheduler = Scheduler(self.config, self.stats, self.events)
        parts = SimParts(self.config, self.scheduler, self.stats, self.events, self.faults)
        self.api = OllamaApi(parts)
        self.admin = AdminApi(parts)
        self._http = HttpServer(self._handle, self._on_error)
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind and start serving; returns the base URL (with the real port)."""
        self.scheduler.start()
        self.host, self.port = await self._http.start(host, port)
        return self.url

    async def stop(self) -> None:
        await self._http.stop()
        await self.scheduler.stop()

    async def _handle(self, request: Request, response: Response) -> None:
        if request.path.startswith("/_sim/"):
            await self.admin.dispatch(request, response)
            return
        stats = self.stats
        stats.requests[f"{request.method} {request.path}"] += 1
        stats.in_flight += 1
        self.events.emit(
            "request",
            request_id=request.request_id,
            method=request.method,
            path=request.path,
            peer_port=request.peer_port,
        )
        try:
            await self.api.dispatch(request, response)
        finally:
            stats.in_flight -= 1
            if response.status is not None:
                stats.responses_by_status[str(response.status)] += 1

    def _on_error(self, request: Request) -> None:
        log.exception("error while handling %s %s", request.method, request.path)


class SimulatorThread:
    """A simulator running on its own event loop in a daemon thread."""

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0):
        self.simulator = Simulator(config)
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ollama-sim", daemon=True)

    @property
    def url(self) -> str:
        return self.simulator.url

    def start(self) -> SimulatorThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        try:
            await self.simulator.start(self._host, self._port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.simulator.stop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> SimulatorThread:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_in_thread(
    config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> SimulatorThread:
    """Start a simulator in a background thread; use ``.url`` and ``.stop()``."""
    return SimulatorThread(config, host, port).start()
