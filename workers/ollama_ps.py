"""Which models an Ollama host has loaded: ``GET /api/ps``, read without ever raising."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import requests


@dataclass(frozen=True)
class LoadedModel:
    name: str
    size_bytes: int
    vram_bytes: int
    expires_in_s: float | None  # None: kept loaded forever (keep_alive -1) or not given
    expires_at: str | None = None  # as Ollama sent it


@dataclass(frozen=True)
class HostState:
    host: str
    up: bool
    models: list[LoadedModel] = field(default_factory=list)
    error: str = ""
    checked_at: float = 0.0


def fetch_ps(
    host: str, timeout_s: float = 2.0, session: requests.Session | None = None
) -> HostState:
    """Ask one Ollama host for its loaded models; never raises."""
    now = time.time()
    getter = session or requests
    try:
        reply = getter.get(host.rstrip("/") + "/api/ps", timeout=(timeout_s, timeout_s))
        reply.raise_for_status()
        data = reply.json()
    except (requests.RequestException, ValueError) as exc:
        return HostState(host, False, error=f"{type(exc).__name__}: {exc}"[:300], checked_at=now)
    models = [_loaded(m, now) for m in data.get("models") or [] if isinstance(m, dict)]
    return HostState(host, True, sorted(models, key=lambda m: m.name), checked_at=now)


def _loaded(entry: dict[str, Any], now: float) -> LoadedModel:
    return LoadedModel(
        name=str(entry.get("name") or entry.get("model") or "?"),
        size_bytes=int(entry.get("size") or 0),
        vram_bytes=int(entry.get("size_vram") or 0),
        expires_in_s=_seconds_until(entry.get("expires_at"), now),
        expires_at=entry.get("expires_at") if isinstance(entry.get("expires_at"), str) else None,
    )


def _seconds_until(stamp: Any, now: float) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp)  # 3.11 reads Go's RFC 3339 with nanoseconds
    except ValueError:
        return None
    left = moment.timestamp() - now
    return None if left > 10 * 365 * 86400 else max(0.0, left)  # keep_alive -1: year 2318


def fetch_all(hosts: list[str], timeout_s: float = 2.0) -> list[HostState]:
    """Every host in parallel; the wait is one timeout however many hosts there are."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        return list(pool.map(lambda h: fetch_ps(h, timeout_s), hosts))
