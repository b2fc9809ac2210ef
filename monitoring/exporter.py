"""The Prometheus exporter: ``python -m monitoring.exporter --port 9808`` (``corral exporter``).

It covers what Flower's /metrics lacks: per-model queue depth and age, unacked messages, task
outcomes by kind and model, latency histograms, tokens, errors by class, Ollama's loaded models,
and the scheduler's view: pending work by priority and tenant, waits, model switches per host.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, disable_created_metrics, make_wsgi_app

from monitoring.events import EventFeed
from monitoring.metrics import TOP_TENANTS, StateCollector, TaskMetrics
from monitoring.ollama_ps import PsPoller
from monitoring.snapshot import RedisSnapshot
from tasks.app import create_app
from tasks.settings import load_settings

log = logging.getLogger("corral.exporter")


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        """Scrapes every few seconds would drown the log."""


class Exporter:
    """The registry, its feeders and an HTTP server, started and stopped together."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        cache_s: float = 1.0,
        ps_every_s: float = 5.0,
        discover_every_s: float = 10.0,
        events: bool = True,
        top_tenants: int = TOP_TENANTS,
    ) -> None:
        self.settings = load_settings(redis_url=redis_url)
        self.redis = redis.Redis.from_url(
            self.settings.redis_url,
            health_check_interval=10,
            socket_timeout=5,
            socket_connect_timeout=5,
        )
        self.app = create_app(self.settings, main="corral-exporter")
        self.registry = CollectorRegistry()
        self.metrics = TaskMetrics.create(self.registry)
        self.snapshot = RedisSnapshot(
            self.redis,
            max_age_s=cache_s,
            discover_every_s=discover_every_s,
            settings=self.settings,
        )
        self.poller = PsPoller(lambda: self.snapshot.get().hosts(), every_s=ps_every_s)
        self.feed = EventFeed(self.app, self.redis, self.metrics) if events else None
        self.registry.register(
            StateCollector(
                self.snapshot.get,
                self.poller.states,
                lambda: self.feed is None or self.feed.connected,
                top_tenants,
            )
        )
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Start the feeders and the HTTP server; returns the bound port (0 picks one)."""
        if self.feed is not None:
            self.feed.start()
        self.poller.start()
        self._server = make_server(
            host, port, make_wsgi_app(self.registry), _Server, handler_class=_QuietHandler
        )
        threading.Thread(target=self._server.serve_forever, name="http", daemon=True).start()
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        if self.feed is not None:
            self.feed.stop()
        self.poller.stop()
        self.app.close()
        self.redis.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral exporter", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9808, help="port to listen on (0: any)")
    parser.add_argument("--redis-url", help="default: CORRAL_REDIS_URL")
    parser.add_argument(
        "--cache-seconds",
        type=float,
        default=1.0,
        help="serve repeated scrapes from one Redis read this long",
    )
    parser.add_argument(
        "--ps-interval",
        type=float,
        default=5.0,
        help="seconds between /api/ps polls of each Ollama host",
    )
    parser.add_argument(
        "--discover-interval",
        type=float,
        default=10.0,
        help="seconds between reads of the indexes of queues, workers and hosts",
    )
    parser.add_argument(
        "--top-tenants",
        type=int,
        default=TOP_TENANTS,
        help="tenants shown by name per model in corral_scheduler_tenant_pending_tasks; the "
        'others add up under tenant="other"',
    )
    args = parser.parse_args(argv)
    disable_created_metrics()  # the *_created series double the scrape and help no dashboard
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    exporter = Exporter(
        args.redis_url,
        cache_s=args.cache_seconds,
        ps_every_s=args.ps_interval,
        discover_every_s=args.discover_interval,
        top_tenants=args.top_tenants,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    port = exporter.serve(args.host, args.port)
    # One line with the URL, for people and for the tests that start it.
    print(f"corral exporter serving http://{args.host}:{port}/metrics", flush=True)
    done.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
