"""API keys: stored only as SHA-256 hashes in Redis, each with an optional model allow-list.

A key is also its caller's **tenant** for the scheduler: the tasks it submits share their models'
slots with other keys in proportion to the key's weight, at a priority capped by the key. A key
made with ``user_tenants`` lets the OpenAI ``user`` field name a sub-tenant ``<id>/<user>``.

A key reads ``crl_<id>_<secret>``. The id is public (listing, revoking, limits); the secret is
shown once, at creation. Redis holds the key's record under the SHA-256 of the whole key
(:func:`tasks.keys.api_key_key`), and an index id → hash (:data:`tasks.keys.API_KEYS_KEY`) to
list and revoke by id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from tasks.errors import InvalidRequest
from tasks.keys import API_KEYS_KEY, SCHED_WEIGHTS_KEY, api_key_key, canonical_model
from tasks.scheduler import DEFAULT_PRIORITY, check_priority, check_weight

TOKEN_PREFIX = "crl_"


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """What the gateway knows about a key (never the key itself)."""

    id: str
    name: str
    models: list[str] = field(default_factory=list)  # canonical names; empty: every model
    rate_per_minute: int | None = None  # None: the gateway's default
    max_in_flight: int | None = None
    created_at: float = 0.0
    weight: float | None = None  # share of a model's slots against other tenants (None: 1)
    max_priority: int | None = None  # the highest priority its tasks get (None: any)
    user_tenants: bool = False  # OpenAI's ``user`` names a sub-tenant of this key

    @property
    def tenant(self) -> str:
        """The scheduler's tenant for this key's tasks: its public id."""
        return self.id

    def tenant_for(self, user: str | None) -> str:
        """The tenant of a task sent with OpenAI's ``user``: the key's own, or with
        ``user_tenants`` the sub-tenant ``<id>/<user>`` (the prefix keeps one key's users from
        ever naming another key's tenant)."""
        if user and self.user_tenants:
            return f"{self.id}/{user}"
        return self.tenant

    def priority(self, requested: int | None) -> int:
        """The priority a task of this key gets: as requested (default 5), capped."""
        wanted = DEFAULT_PRIORITY if requested is None else check_priority(requested)
        return wanted if self.max_priority is None else min(wanted, self.max_priority)

    def allows(self, model: str) -> bool:
        if not self.models:
            return True
        try:
            return canonical_model(model) in self.models
        except InvalidRequest:
            return False


def create_key(
    client: redis.Redis,
    name: str,
    *,
    models: list[str] | tuple[str, ...] = (),
    rate_per_minute: int | None = None,
    max_in_flight: int | None = None,
    weight: float | None = None,
    max_priority: int | None = None,
    user_tenants: bool = False,
) -> tuple[str, ApiKey]:
    """Make a key; returns the token (shown once) and its record."""
    weight = None if weight is None else check_weight(weight)
    max_priority = None if max_priority is None else check_priority(max_priority)
    key_id = secrets.token_hex(4)
    token = f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"
    record = ApiKey(
        id=key_id,
        name=name,
        models=sorted({canonical_model(m) for m in models}),
        rate_per_minute=rate_per_minute,
        max_in_flight=max_in_flight,
        created_at=time.time(),
        weight=weight,
        max_priority=max_priority,
        user_tenants=user_tenants,
    )
    digest = digest_of(token)
    pipe = client.pipeline(transaction=True)
    pipe.set(api_key_key(digest), json.dumps(asdict(record)))
    pipe.hset(API_KEYS_KEY, key_id, digest)
    if weight is not None:  # where the scheduler reads it (Scheduler.set_tenant_weight)
        pipe.hset(SCHED_WEIGHTS_KEY, record.tenant, repr(weight))
    pipe.execute()
    return token, record


def list_keys(client: redis.Redis) -> list[ApiKey]:
    index = client.hgetall(API_KEYS_KEY)
    if not index:
        return []
    digests = [d.decode() for d in index.values()]
    values = client.mget([api_key_key(d) for d in digests])
    keys = [_parse(v) for v in values if v]
    return sorted(keys, key=lambda k: k.created_at)


def revoke_key(client: redis.Redis, key_id: str) -> bool:
    digest = client.hget(API_KEYS_KEY, key_id)
    if digest is None:
        return False
    pipe = client.pipeline(transaction=True)
    pipe.delete(api_key_key(digest.decode()))
    pipe.hdel(API_KEYS_KEY, key_id)
    pipe.hdel(SCHED_WEIGHTS_KEY, key_id)
    pipe.execute()
    return True


def any_keys(client: redis.Redis) -> bool:
    return bool(client.hlen(API_KEYS_KEY))


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def lookup(raw: Any, token: str) -> ApiKey | None:
    """The record stored for ``token`` (``raw`` is the GET of its hash key), checked in full."""
    if raw is None:
        return None
    record = _parse(raw)
    # The hash already matched; comparing the id too guards against a stale record.
    expected_id = token.removeprefix(TOKEN_PREFIX).split("_", 1)[0]
    return record if hmac.compare_digest(record.id, expected_id) else None


def _parse(raw: bytes | str) -> ApiKey:
    data = json.loads(raw)
    return ApiKey(**{k: v for k, v in data.items() if k in ApiKey.__dataclass_fields__})
