"""``corral gateway`` and ``corral keys create|list|revoke``.

Register them on the CLI with ``cli.add_command(gateway)`` and ``cli.add_command(keys)``.
"""

from __future__ import annotations

import json
import sys
import time

import click
import redis

from producers.cli.redis_bootstrap import ensure_redis
from producers.cli.render import handle_errors
from producers.gateway.auth import any_keys, create_key, list_keys, revoke_key
from producers.gateway.config import load_core_settings, load_gateway_config
from tasks.errors import BrokerUnavailable
from tasks.redis_url import masked
from tasks.scheduler import MAX_PRIORITY
from tasks.settings import Settings
from workers.embedded_redis import is_loopback


def _settings() -> Settings:
    settings = load_core_settings()
    ensure_redis(settings.redis_url)
    return settings


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to bind.")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Bind beyond loopback even though no API key exists (anyone may submit).",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
@handle_errors
def gateway(host: str, port: int, insecure_no_auth: bool, log_level: str) -> None:
    """Serve the HTTP gateway: the /v1 task API, the Ollama facade (/api) and the playground (/).

    Without an API key (`corral keys create`) it binds only to loopback, unless told
    --insecure-no-auth. Bound beyond loopback with keys, it demands a key on every call, even
    if all keys are revoked later.
    """
    import uvicorn

    from producers.gateway.app import create_app

    settings = _settings()
    config = load_gateway_config()
    try:
        keyed = any_keys(redis.Redis.from_url(settings.redis_url))
    except redis.RedisError as exc:
        where = masked(settings.redis_url)
        raise BrokerUnavailable(f"cannot reach Redis at {where}: {exc}") from exc
    local = is_loopback(host)
    if not keyed and not local and not insecure_no_auth:
        raise click.ClickException(
            f"refusing to bind {host} without any API key: create one with `corral keys create "
            "NAME`, bind 127.0.0.1, or pass --insecure-no-auth"
        )
    app = create_app(settings, config, require_auth=not local and not insecure_no_auth)
    click.echo(f"corral gateway on http://{host}:{port} (docs at /docs, playground at /)", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=False)


@click.group()
def keys() -> None:
    """API keys of the HTTP gateway (stored in Redis as hashes only)."""


@keys.command("create")
@click.argument("name")
@click.option("--model", "models", multiple=True, help="Allow only this model (repeatable).")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute for this key.")
@click.option("--max-in-flight", type=click.IntRange(min=1), help="Unfinished tasks at once.")
@click.option(
    "--weight",
    type=float,
    help="Share of a model's slots against other keys (default 1; up to 1000).",
)
@click.option(
    "--max-priority",
    type=click.IntRange(0, MAX_PRIORITY),
    help=f"Highest priority this key's tasks get (0-{MAX_PRIORITY}; default: any).",
)
@click.option(
    "--user-tenants",
    is_flag=True,
    help="OpenAI's `user` field names a sub-tenant of this key (KEY_ID/USER), each with a fair "
    "share of its own; without it the key is the tenant of all its tasks.",
)
@handle_errors
def keys_create(
    name: str,
    models: tuple[str, ...],
    rpm: int | None,
    max_in_flight: int | None,
    weight: float | None,
    max_priority: int | None,
    user_tenants: bool,
) -> None:
    """Create a key; it is printed once and never stored in clear. The key is its callers'
    tenant: its tasks share each model with other keys' tasks by weight."""
    client = redis.Redis.from_url(_settings().redis_url)
    token, record = create_key(
        client,
        name,
        models=models,
        rate_per_minute=rpm,
        max_in_flight=max_in_flight,
        weight=weight,
        max_priority=max_priority,
        user_tenants=user_tenants,
    )
    click.echo(f"key {record.id} ({name}) created; keep it now, it is not shown again:", err=True)
    click.echo(token)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@handle_errors
def keys_list(as_json: bool) -> None:
    """The keys: id, name, allowed models, limits (never the secret)."""
    records = list_keys(redis.Redis.from_url(_settings().redis_url))
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in records], indent=2))
        return
    if not records:
        click.echo("no keys: the gateway runs without authentication on loopback only")
        return
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at))
        models = ",".join(r.models) or "any model"
        limits = (
            f"rpm={r.rate_per_minute or 'default'} in-flight={r.max_in_flight or 'default'} "
            f"weight={r.weight or 1:g} max-priority="
            f"{'any' if r.max_priority is None else r.max_priority}"
            f"{' user-tenants' if r.user_tenants else ''}"
        )
        click.echo(f"{r.id}  {r.name:<20} {created}  {models}  {limits}")


@keys.command("revoke")
@click.argument("key_id")
@handle_errors
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (the part after ``crl_``); it stops working at once."""
    if not revoke_key(redis.Redis.from_url(_settings().redis_url), key_id):
        click.echo(f"no key with id {key_id}", err=True)
        sys.exit(1)
    click.echo(f"key {key_id} revoked")
