"""Start a Celery worker process with the options this kind of work needs."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from celery import Celery
from celery.concurrency import get_implementation
from celery.utils.log import mlevel
from celery.utils.nodenames import default_nodename, host_format


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


def run_worker(app: Celery, options: WorkerOptions) -> int:
    """Run the worker in this process until it stops; return its exit status.

    It is ``celery worker --prefetch-multiplier 1 --without-mingle --without-gossip`` (with
    ``--task-events``) started without Celery's command line, which loads every installed
    ``celery`` subcommand plugin (Flower with Tornado, the REPL with prompt_toolkit): about
    13 MiB that a worker never uses. Late acks come from the app's configuration.
    ``app.worker_main`` would also drop the exit status: after Celery's "Unrecoverable error"
    the process would then exit 0, and a supervisor would take that for a requested stop.
    """
    # Also in the configuration, where per-process parts (the HTTP pool) read them.
    app.conf.worker_concurrency = options.concurrency
    app.conf.worker_pool = options.pool
    worker = app.Worker(
        hostname=host_format(
            default_nodename(options.node_name or default_node_name(options.queues))
        ),
        pool=get_implementation(options.pool),
        concurrency=options.concurrency,
        queues=list(options.queues),
        loglevel=mlevel(options.loglevel.upper()),
        prefetch_multiplier=1,
        without_mingle=True,
        without_gossip=True,
        task_events=options.events,
        optimization="default",
    )
    worker.start()
    return int(worker.exitcode or 0)
