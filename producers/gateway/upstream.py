"""Calls that have no task kind go straight to an Ollama host the workers announced.

``/api/embed`` and ``/api/show`` go to a host whose workers serve the model (any host if none
does); ``/api/tags`` and ``/api/ps`` are gathered from every host, merged by model name.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httpx
from starlette.responses import Response

from producers.gateway.auth import ApiKey
from producers.gateway.limits import Refusal
from tasks.errors import InvalidRequest
from tasks.keys import queue_name
from tasks.registry import WorkerInfo
from tasks.settings import Settings
from tasks.tls import tls_config
from workers.ollama_client import TLSConfig


def make_http_client(settings: Settings, read_timeout_s: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(read_timeout_s, connect=settings.connect_timeout_s)
    return httpx.AsyncClient(verify=ssl_context(tls_config(settings)), timeout=timeout)


def ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """The TLS the workers use towards Ollama (CA bundle, client certificate), for httpx."""
    context = ssl.create_default_context(cafile=tls.ca_bundle)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert:
        context.load_cert_chain(tls.client_cert, tls.client_key)
    return context


def hosts_for(workers: list[WorkerInfo], model: str | None = None) -> list[str]:
    """Ollama hosts, those serving ``model`` first; refuses when no worker is online."""
    preferred: list[str] = []
    others: list[str] = []
    wanted = None
    if model:
        try:
            wanted = queue_name(model)
        except InvalidRequest:
            wanted = None
    for worker in workers:
        bucket = preferred if wanted and wanted in worker.queues else others
        if worker.ollama_host not in preferred and worker.ollama_host not in others:
            bucket.append(worker.ollama_host)
    hosts = preferred + others
    if not hosts:
        raise Refusal(503, "NoOllamaHost", "no worker is online, so no Ollama host is known", 5)
    return hosts


def serves(workers: list[WorkerInfo], model: str) -> bool:
    """Whether a live worker consumes ``model``'s queue (never, for an invalid name)."""
    try:
        wanted = queue_name(model)
    except InvalidRequest:
        return False
    return any(wanted in worker.queues for worker in workers)


async def forward(
    http: httpx.AsyncClient, hosts: list[str], method: str, path: str, body: Any = None
) -> Response:
    """The first host that answers, its status and body relayed as they are."""
    last_error: Exception | None = None
    for host in hosts:
        try:
            reply = await http.request(method, host.rstrip("/") + path, json=body)
        except httpx.HTTPError as exc:
            last_error = exc
            continue
        return Response(
            reply.content,
            status_code=reply.status_code,
            media_type=reply.headers.get("content-type", "application/json; charset=utf-8"),
        )
    raise Refusal(502, "OllamaUnavailable", f"no Ollama host answered: {last_error}")


async def gather_models(
    http: httpx.AsyncClient, hosts: list[str], path: str, key: ApiKey | None
) -> dict[str, Any]:
    """``/api/tags`` or ``/api/ps`` of every host, merged (first host wins on a name)."""
    replies = await asyncio.gather(
        *(http.get(h.rstrip("/") + path) for h in hosts), return_exceptions=True
    )
    answered = [r for r in replies if isinstance(r, httpx.Response) and r.status_code == 200]
    if not answered:
        raise Refusal(502, "OllamaUnavailable", f"no Ollama host answered {path}")
    seen: set[str] = set()
    models: list[dict[str, Any]] = []
    for reply in answered:
        for item in reply.json().get("models") or []:
            name = str(item.get("name") or item.get("model") or "")
            if name in seen or (key is not None and not key.allows(name)):
                continue
            seen.add(name)
            models.append(item)
    if path.endswith("/ps"):
        models.sort(key=lambda m: str(m.get("expires_at", "")), reverse=True)
    return {"models": models}
