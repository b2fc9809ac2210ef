"""``corral webhooks``: the deliveries that exhausted their attempts, and replaying them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import click

from producers.cli.main import client
from producers.cli.render import dump_json, handle_errors, table
from tasks.errors import InvalidRequest
from tasks.webhooks import Webhook, dead_webhooks, pending_webhooks, retry_dead


@click.group()
def webhooks() -> None:
    """Webhook deliveries: dead letters (attempts exhausted) and still pending ones."""


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _subject(hook: Webhook) -> str:
    try:
        data = json.loads(hook.body).get("data") or {}
    except ValueError:
        return "?"
    return str(data.get("id", "?")) if isinstance(data, dict) else "?"


@webhooks.command("list")
@click.option("--pending", is_flag=True, help="List the deliveries still being tried instead.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (with bodies).")
@handle_errors
def webhooks_list(pending: bool, as_json: bool) -> None:
    """List dead webhook deliveries (attempts exhausted), oldest first."""
    redis = client().redis
    hooks = pending_webhooks(redis) if pending else dead_webhooks(redis)
    if as_json:
        dump_json([asdict(h) for h in hooks])
        return
    table(
        ["WEBHOOK", "TYPE", "SUBJECT", "URL", "ATTEMPTS", "LAST ERROR", "LAST ATTEMPT"],
        [
            (
                h.id,
                h.type,
                _subject(h),
                h.url,
                h.attempts,
                h.last_error[:60],
                _when(h.last_attempt_at),
            )
            for h in hooks
        ],
    )


@webhooks.command("retry")
@click.argument("webhook_ids", nargs=-1)
@click.option("--all", "retry_all", is_flag=True, help="Replay every dead delivery.")
@handle_errors
def webhooks_retry(webhook_ids: tuple[str, ...], retry_all: bool) -> None:
    """Send dead deliveries again, with a fresh set of attempts (same webhook-id)."""
    if not webhook_ids and not retry_all:
        raise InvalidRequest(
            "name webhook ids to retry (`corral webhooks list`), or pass --all", field="webhook_ids"
        )
    redis = client().redis
    if webhook_ids:
        known = {h.id for h in dead_webhooks(redis)}
        missing = [i for i in webhook_ids if i not in known]
        if missing:
            raise InvalidRequest(
                f"{', '.join(missing)} is not a dead delivery; `corral webhooks list` shows them",
                field="webhook_ids",
            )
    revived = retry_dead(redis, list(webhook_ids) or None)
    for webhook_id in revived:
        click.echo(f"{webhook_id}: due again")
    click.echo(f"{len(revived)} deliveries due again")
