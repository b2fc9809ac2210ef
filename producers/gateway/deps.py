"""Route dependencies: the app's :class:`Gateway`, and the caller's API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from producers.gateway.auth import TOKEN_PREFIX, ApiKey, digest_of, lookup, parse_bearer
from producers.gateway.limits import Refusal, check_rate
from producers.gateway.service import Gateway
from tasks.keys import API_KEYS_KEY, api_key_key


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def authorize(request: Request) -> ApiKey | None:
    """The caller's key (None when the gateway runs without keys); 401/429 otherwise."""
    gw = gateway_of(request)
    token = parse_bearer(request.headers.get("authorization"))
    if token is not None and not token.startswith(TOKEN_PREFIX) and not gw.require_auth:
        # Not a corral key (the openai SDKs always send one): judged as if absent.
        token = None
    if token is None:
        if gw.require_auth or await gw.redis.hlen(API_KEYS_KEY):
            raise Refusal(
                401, "Unauthorized", "missing API key: send 'Authorization: Bearer <key>'"
            )
        return None
    key = lookup(await gw.redis.get(api_key_key(digest_of(token))), token)
    if key is None:
        raise Refusal(401, "Unauthorized", "unknown or revoked API key")
    await check_rate(gw.redis, key, gw.config.rate_per_minute)
    return key


Key = Annotated[ApiKey | None, Depends(authorize)]
