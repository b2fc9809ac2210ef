"""The gateway's own settings (``CORRAL_GATEWAY_*``), read once, next to the core settings.

The core settings refuse every unknown ``CORRAL_*`` name except ``CORRAL_GATEWAY_*``, which
:func:`load_core_settings` checks against this class.
"""

from __future__ import annotations

import ipaddress
from functools import cached_property

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import InvalidSetting
from tasks.settings import Settings, build_settings, load_settings, refuse_unknown_env

GATEWAY_PREFIX = "CORRAL_GATEWAY_"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class GatewayConfig(BaseSettings):
    """HTTP gateway configuration (environment variables ``CORRAL_GATEWAY_*``)."""

    model_config = SettingsConfigDict(env_prefix=GATEWAY_PREFIX, extra="forbid", frozen=True)

    rate_per_minute: int = Field(
        600, gt=0, description="Requests per minute per API key, unless the key sets its own."
    )
    max_in_flight: int = Field(
        32, gt=0, description="Unfinished tasks per API key, unless the key sets its own."
    )
    ip_allow: str = Field(
        "", description="Comma-separated client networks (CIDR) allowed in; empty: any."
    )
    upstream_timeout_s: float = Field(
        300.0, gt=0, description="Read timeout of calls proxied to Ollama (embed, show, tags...)."
    )
    sse_ping_s: float = Field(15.0, gt=0, description="Comment line sent on a silent SSE stream.")

    @cached_property
    def allowed_networks(self) -> tuple[IPNetwork, ...]:
        try:
            return tuple(
                ipaddress.ip_network(part.strip(), strict=False)
                for part in self.ip_allow.split(",")
                if part.strip()
            )
        except ValueError as exc:
            raise InvalidSetting(
                f"CORRAL_GATEWAY_IP_ALLOW={self.ip_allow!r} is not valid: {exc}; "
                "give networks like 10.0.0.0/8,192.168.1.5 or unset it",
                field="CORRAL_GATEWAY_IP_ALLOW",
            ) from exc


def load_core_settings(**overrides: object) -> Settings:
    """:func:`tasks.settings.load_settings`, also refusing unknown ``CORRAL_GATEWAY_*`` names
    (the core settings leave those to this class)."""
    refuse_unknown_env(GatewayConfig, GATEWAY_PREFIX)
    return load_settings(**overrides)


def load_gateway_config(**overrides: object) -> GatewayConfig:
    config = build_settings(GatewayConfig, overrides)
    _ = config.allowed_networks  # refuse a bad allow-list at start, not on the first request
    return config
