"""Operator commands: ``corral status``, ``corral flower``, ``corral exporter``.

``flower`` and ``exporter`` replace this process with ``python -m monitoring.…`` (nothing imports
``monitoring/``), so signals reach them directly and their own ``--help`` answers.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from typing import Any

import click
import redis

from producers.cli.redis_bootstrap import ensure_redis
from producers.cli.render import by_priority, dump_json, handle_errors, table
from tasks.errors import BrokerUnavailable
from tasks.keys import DLQ_KEY, KOMBU_UNACKED, model_of_queue
from tasks.queues import host_overview, queue_overview
from tasks.redis_url import masked
from tasks.registry import live_workers
from tasks.settings import Settings, load_settings
from workers.ollama_ps import HostState, fetch_all

PS_TIMEOUT_S = 2.0
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _settings() -> Settings:
    settings = load_settings()
    ensure_redis(settings.redis_url)
    return settings


# -- status ---------------------------------------------------------------------------------
def host_status(state: HostState) -> dict[str, Any]:
    """One Ollama host for ``corral status --json``."""
    loaded = [
        {"model": m.name, "size_vram": m.vram_bytes, "expires_at": m.expires_at}
        for m in state.models
    ]
    return {"host": state.host, "up": state.up, "loaded": loaded, "error": state.error}


def collect_status(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    """Queues, workers and Ollama hosts, as one JSON-ready dict."""
    workers = live_workers(client)
    queues = [asdict(row) for row in queue_overview(client, workers, settings)]
    pipe = client.pipeline(transaction=False)
    pipe.hlen(KOMBU_UNACKED)
    pipe.hlen(DLQ_KEY)
    unacked, dead = pipe.execute()
    hosts = sorted({w.ollama_host for w in workers})
    host_states = fetch_all(hosts, PS_TIMEOUT_S)
    served = {h.host: h for h in host_overview(client, settings, hosts)}
    return {
        "queues": queues,
        "workers": [asdict(w) for w in workers],
        "ollama_hosts": [
            {
                **host_status(h),
                "serving": served[h.host].model,
                "model_switches": served[h.host].switches,
            }
            for h in host_states
        ],
        "unacked": int(unacked),
        "dead_letters": int(dead),
    }


def print_status(data: dict[str, Any]) -> None:
    click.echo("QUEUES")
    table(
        ["MODEL", "QUEUE", "WAITING", "PENDING", "BY PRIORITY", "RUNNING", "WORKERS", "SLOTS"],
        [
            (
                q["model"],
                q["queue"],
                q["waiting"],
                q["pending"],
                by_priority({int(b): n for b, n in q["by_priority"].items()}),
                q["running"],
                q["workers"],
                q["slots"],
            )
            for q in data["queues"]
        ],
        out=sys.stdout,
    )
    click.echo(f"running or reserved: {data['unacked']}    dead letters: {data['dead_letters']}")
    click.echo("\nWORKERS")
    now = time.time()
    table(
        ["NODE", "MODELS", "SLOTS", "POOL", "OLLAMA HOST", "UP"],
        [
            (
                w["node"],
                ", ".join(model_of_queue(q) for q in w["queues"]),
                w["slots"],
                w["pool"],
                w["ollama_host"],
                _uptime(now - w["started_at"]),
            )
            for w in data["workers"]
        ],
        out=sys.stdout,
    )
    click.echo("\nOLLAMA HOSTS")
    rows = []
    for h in data["ollama_hosts"]:
        models = ", ".join(str(m["model"]) for m in h["loaded"]) or "(none loaded)"
        state = "up" if h["up"] else f"DOWN ({h['error'].split(':')[0]})"
        rows.append((h["host"], state, models, h["serving"] or "-", h["model_switches"]))
    table(
        ["HOST", "STATE", "LOADED MODELS", "SCHEDULED FOR", "MODEL SWITCHES"], rows, out=sys.stdout
    )


def _uptime(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def status(as_json: bool) -> None:
    """What runs: queue depth per model, the workers, the Ollama hosts and their loaded models."""
    settings = _settings()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        data = collect_status(client, settings)
    except redis.RedisError as exc:
        where = masked(settings.redis_url)
        raise BrokerUnavailable(f"cannot read Redis at {where}: {exc}") from exc
    finally:
        client.close()
    if as_json:
        dump_json(data, out=sys.stdout)  # render's default stream is bound at import
    else:
        print_status(data)


# -- services -------------------------------------------------------------------------------
def _exec_module(module: str, args: list[str]) -> None:
    if not {"--help", "-h"} & set(args):
        _settings()  # refuse bad settings, and start the embedded Redis for a local run
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *args])


@click.command(context_settings=PASS_THROUGH)
@click.pass_context
@handle_errors
def flower(ctx: click.Context) -> None:
    """Run Flower on this project's app, listing every model queue (options: Flower's own,
    e.g. --port=5555 --basic-auth=user:pass; `corral flower --help` lists them)."""
    _exec_module("monitoring.flower", list(ctx.args))


@click.command(context_settings=PASS_THROUGH)
@click.pass_context
@handle_errors
def exporter(ctx: click.Context) -> None:
    """Run the Prometheus exporter (--port 9808 by default; `corral exporter --help`)."""
    _exec_module("monitoring.exporter", list(ctx.args))


COMMANDS = (status, flower, exporter)
