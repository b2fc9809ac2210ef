"""The machine's description, the printed table and the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("celery", "kombu", "redis", "requests", "urllib3", "psutil")


def machine() -> dict[str, Any]:
    cpu: str | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory_gib: float | None = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gib = None
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "redis_server": redis_version(),
        "packages": versions,
    }


def redis_version() -> str | None:
    from workers.embedded_redis import redis_server_binary

    try:
        out = subprocess.run(
            [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or None


def fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"


def table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per metric, median [min, max] over repeats."""
    lines = [
        "| scenario | metric | unit | median | min | max | repeats |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, scenario in results["scenarios"].items():
        if scenario.get("error"):
            first_line = str(scenario["error"]).splitlines()[0]
            lines.append(f"| {name} | FAILED: {first_line} | | | | | |")
            continue
        for metric, s in scenario["metrics"].items():
            label = f"**{metric}**" if s["kind"] == "ratio" else metric
            lines.append(
                f"| {name} | {label} | {s['unit']} | {fmt(s['median'])} | "
                f"{fmt(s['min'])} | {fmt(s['max'])} | {len(s['values'])} |"
            )
    notes = [
        f"- {name}: {note}"
        for name, scenario in results["scenarios"].items()
        for note in scenario.get("notes", [])
    ]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
