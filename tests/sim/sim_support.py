"""Shared test data and waiting helpers for the simulator tests."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable
from typing import Any

import requests
from PIL import Image

from ollama_sim import ModelSpec, default_models

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
BUSY = "server busy, please try again.  maximum pending requests exceeded"
RUNNER_STOPPED = (
    "model runner has unexpectedly stopped, this may be due to resource limitations or an "
    "internal error, check ollama server logs for details"
)


def fast_models(
    load_s: float = 0.0, tokens_per_s: float = 0.0, first_token_s: float = 0.0
) -> list[ModelSpec]:
    """The default catalogue with test-sized timings (0 = instant, 0 tokens/s = unlimited)."""
    return [
        dataclasses.replace(
            m, load_s=load_s, tokens_per_s=tokens_per_s, first_token_s=first_token_s
        )
        for m in default_models()
    ]


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def wait_event(
    url: str, predicate: Callable[[dict[str, Any]], bool], since: int = 0, timeout_s: float = 20.0
) -> dict[str, Any]:
    """Long-poll ``/_sim/events`` until an event matches."""
    import time

    deadline = time.monotonic() + timeout_s
    with requests.Session() as http:
        while (left := deadline - time.monotonic()) > 0:
            page = http.get(
                f"{url}/_sim/events",
                params={"since": since, "wait": min(left, 5)},
                timeout=left + 5,
            ).json()
            for event in page["events"]:
                if predicate(event):
                    return event
            since = page["next"]
    raise AssertionError("timed out waiting for a simulator event")


def wait_stats(
    url: str, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 20.0
) -> dict[str, Any]:
    """Re-read ``/_sim/stats`` after each new event until ``predicate`` holds."""
    import time

    deadline = time.monotonic() + timeout_s
    with requests.Session() as http:
        since = http.get(f"{url}/_sim/events", timeout=10).json()["next"]
        while True:
            stats = http.get(f"{url}/_sim/stats", timeout=10).json()
            if predicate(stats):
                return stats
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"stats never matched: {stats}")
            page = http.get(
                f"{url}/_sim/events",
                params={"since": since, "wait": min(left, 1)},
                timeout=left + 5,
            ).json()
            since = page["next"]
