"""The scenario registry: a scenario is one module in ``benchmarks/scenarios/`` with one
``@scenario`` function. Nothing else needs to change to add one::

    # benchmarks/scenarios/gateway.py
    from benchmarks.registry import scenario

    @scenario("gateway", "the gateway's added latency against the SDK", order=70)
    def run(ctx, metrics):
        stack = ctx.standard_stack()
        for repeat in ctx.repeats(5):
            ...
            metrics.add("gateway p50 / SDK p50", ratio(gateway, sdk), "x", kind="ratio")
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.stack import Context
    from benchmarks.stats import Metrics

RunFunction = Callable[["Context", "Metrics"], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: RunFunction
    order: int = 100  # position in a default run
    default: bool = True  # False: runs only when named (a soak of many minutes)


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str, summary: str, *, order: int = 100, default: bool = True
) -> Callable[[RunFunction], RunFunction]:
    """Register ``run(ctx, metrics)`` under ``name``; ``default=False`` leaves it out of a run
    that names no scenario."""

    def register(run: RunFunction) -> RunFunction:
        if name in SCENARIOS:
            raise ValueError(f"two scenarios are named {name!r}")
        SCENARIOS[name] = Scenario(name, summary, run, order, default)
        return run

    return register


def load_scenarios() -> list[Scenario]:
    """Import every module of ``benchmarks.scenarios``; return the scenarios in run order."""
    import benchmarks.scenarios as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return sorted(SCENARIOS.values(), key=lambda s: (s.order, s.name))
