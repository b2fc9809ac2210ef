"""Settings read once and used alike: unknown names refused by the class that owns them, and
the same TLS towards Ollama from the workers and from the gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import trustme
from test_ollama_client import TLSProxy, ca, tls_proxy  # noqa: F401

from producers.gateway.config import load_core_settings
from producers.gateway.upstream import make_http_client
from tasks.errors import InvalidRequest
from tasks.settings import Settings, load_settings
from tasks.tls import tls_config
from workers.ollama_client import TLSConfig


def test_unknown_settings_are_refused_by_the_class_that_owns_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CORRAL_GATEWAY_MAX_IN_FLIGHT", "5")
    monkeypatch.setenv("CORRAL_GATEWAY_RATE_PER_MINUTES", "5")
    assert load_settings().redis_url  # the gateway's names are the gateway's to check
    with pytest.raises(InvalidRequest, match="CORRAL_GATEWAY_RATE_PER_MINUTES") as info:
        load_core_settings()
    assert info.value.field == "CORRAL_GATEWAY_RATE_PER_MINUTES"
    monkeypatch.delenv("CORRAL_GATEWAY_RATE_PER_MINUTES")
    assert load_core_settings().redis_url
    monkeypatch.setenv("CORRAL_STREAM_TTL", "60")
    for load in (load_settings, load_core_settings):
        with pytest.raises(InvalidRequest, match="CORRAL_STREAM_TTL; run `corral config`"):
            load()


def test_tls_settings_map_to_the_ollama_clients_config(tmp_path: Path) -> None:
    ca_bundle, cert, key = tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k.pem"
    settings = Settings(
        tls_verify=False, tls_ca_bundle=ca_bundle, tls_client_cert=cert, tls_client_key=key
    )
    assert tls_config(settings) == TLSConfig(
        verify=False,
        ca_bundle=str(ca_bundle),
        client_cert=str(cert),
        client_key=str(key),
    )
    assert tls_config(Settings()) == TLSConfig()


def test_the_gateway_calls_https_ollama_with_the_workers_tls(
    tls_proxy: TLSProxy,  # noqa: F811
    ca: trustme.CA,  # noqa: F811
    tmp_path: Path,
    sim: object,
) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    url = f"https://127.0.0.1:{tls_proxy.port}/api/tags"

    async def get(settings: Settings) -> int:
        async with make_http_client(settings, read_timeout_s=10) as http:
            return (await http.get(url)).status_code

    assert asyncio.run(get(Settings(tls_ca_bundle=bundle))) == 200
    assert asyncio.run(get(Settings(tls_verify=False))) == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(get(Settings()))
