"""TLS towards https Ollama hosts, read from the settings once for every client that calls them.

The workers' ``requests`` client and the gateway's ``httpx`` client (embed, show, tags...) take
the same :class:`~workers.ollama_client.TLSConfig`, so both verify the same way.
"""

from __future__ import annotations

from tasks.settings import Settings
from workers.ollama_client import TLSConfig


def tls_config(settings: Settings) -> TLSConfig:
    """The ``CORRAL_TLS_*`` settings as the Ollama clients take them."""
    return TLSConfig(
        verify=settings.tls_verify,
        ca_bundle=str(settings.tls_ca_bundle) if settings.tls_ca_bundle else None,
        client_cert=str(settings.tls_client_cert) if settings.tls_client_cert else None,
        client_key=str(settings.tls_client_key) if settings.tls_client_key else None,
    )
