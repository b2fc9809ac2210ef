"""CPU time (user + system) of process trees, read with psutil."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import psutil


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and all its descendants (alive ones)."""
    total = 0.0
    for process in tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@contextmanager
def cpu_used(pids: Mapping[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds spent inside the block by each process tree of ``pids`` (by name), then by
    this process as ``client``; the dict it gives is filled when the block ends."""
    used: dict[str, float] = {}
    before = {part: cpu_seconds(pid) for part, pid in pids.items()}
    own = own_cpu_seconds()
    yield used
    used.update({part: cpu_seconds(pid) - before[part] for part, pid in pids.items()})
    used["client"] = own_cpu_seconds() - own


def rss_bytes(pid: int) -> int:
    """Resident set size summed over ``pid`` and its descendants."""
    total = 0
    for process in tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total
