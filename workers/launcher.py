"""Start a Celery worker process with the options this kind of work needs."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from celery import Celery
from celery.bin.celery import celery as celery_command


@dataclass(frozen=True)
class WorkerOptions:
    queues: tuple[str, ...]
    concurrency: int = 1  # Ollama's parallel slots for these models
    pool: str = "threads"
    node_name: str | None = None
    loglevel: str = "INFO"
    events: bool = True  # task events, for Flower and the exporter


def default_node_name(labels: tuple[str, ...]) -> str:
    """``llama3.2-latest@host``: readable in Flower; ':' is not allowed in node names."""
    label = "+".join(re.sub(r"[^A-Za-z0-9._-]+", "-", item) for item in labels) or "worker"
    return f"{label}@{socket.gethostname()}"


def worker_argv(options: WorkerOptions) -> list[str]:
    """The ``celery worker`` arguments; prefetch is 1 and late acks come from the app config."""
    argv = [
        "worker",
        "--queues",
        ",".join(options.queues),
        "--concurrency",
        str(options.concurrency),
        "--pool",
        options.pool,
        "--hostname",
        options.node_name or default_node_name(options.queues),
        "--loglevel",
        options.loglevel,
        "--prefetch-multiplier",
        "1",
        "--without-mingle",
        "--without-gossip",
    ]
    if options.events:
        argv.append("--task-events")
    return argv


def run_worker(app: Celery, options: WorkerOptions) -> int:
    """Run the worker in this process until it stops; return its exit status.

    ``app.worker_main`` (and ``app.start``) drop it: after Celery's "Unrecoverable error" the
    process would then exit 0, and a supervisor would take that for a requested stop.
    """
    # Also in the configuration, where per-process parts (the HTTP pool) read them.
    app.conf.worker_concurrency = options.concurrency
    app.conf.worker_pool = options.pool
    # What app.start() does, keeping click's return value (the worker's exit status).
    celery_command.params[0].default = app
    try:
        return int(celery_command.main(args=worker_argv(options), standalone_mode=False) or 0)
    finally:
        celery_command.params[0].default = None
