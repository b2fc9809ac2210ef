"""Do two tenants with equal weights share a model's slots equally, whatever their backlogs?

One model with two slots and a fixed speed (as in ``priority``). Tenant ``heavy`` admits a
backlog of 1,000 tasks; tenant ``light`` then admits 100 (a tenth). Twice: with tasks of equal
length (the goal's case), then with heavy's tasks twice as long as light's, which shows what
shares counted in tasks, not seconds, give then (docs/scheduling.md).

Both have work from light's last submission (its whole backlog is in) until its last task
ends: in that window each tenant's **slot time** is the sum of its tasks' runs (the worker's
``started_at`` to ``finished_at`` in each result), clipped to the window. Goal: each tenant
between 45 % and 55 % of the slot time. In arrival order, light would get nothing until
heavy's backlog had drained.

What is left of heavy's backlog afterwards is purged; a run never drains it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.registry import scenario
from benchmarks.scenarios.priority import SLOTS, TOKENS_PER_S, timed_simulator
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics
from producers.client import Client
from producers.jobs import Job
from tasks.keys import task_key
from tasks.queues import purge_model

PROMPT = "Classify this document."


@scenario("fairness", "tenants 10x apart in backlog, equal weights: slot-time shares", order=54)
def run(ctx: Context, metrics: Metrics) -> None:
    sim = ctx.simulator(*timed_simulator(SLOTS))
    ctx.corral_worker([MODEL], sim, slots=SLOTS)
    client = ctx.client()
    light_n = ctx.size(100, 8)
    tokens = ctx.size(20, 10)
    client.generate(MODEL, PROMPT, options=options(tokens)).result(timeout=60)  # load the model
    variants = {"": (tokens, tokens), "unequal lengths: ": (2 * tokens, tokens)}
    for repeat in ctx.repeats(3, 1):
        for label, (heavy_tokens, light_tokens) in variants.items():
            shares, window, used = measure(client, light_n, heavy_tokens, light_tokens)
            for name, share in shares.items():
                metrics.add(f"{label}{name} share of slot time", share, "%", "ratio")
            metrics.add(f"{label}window (both have work)", window, "s")
            metrics.add(f"{label}slot utilisation in the window", used, "%")
            ctx.log(
                f"fairness repeat {repeat + 1} {label or 'equal lengths: '}light "
                f"{shares['light']:.1f} %, heavy {shares['heavy']:.1f} % in {window:.1f} s"
            )
    metrics.note(
        f"heavy admits {10 * light_n} tasks, then light {light_n}; equal weights; "
        f"{tokens} tokens at {TOKENS_PER_S:g} tokens/s (unequal lengths: heavy's tasks "
        f"{2 * tokens} tokens), worker --slots {SLOTS}; window = light's last submit to its "
        "last finish; goal: each 45-55 %"
    )


def options(tokens: int) -> dict[str, Any]:
    return {"num_predict": tokens, "temperature": 0}


def measure(
    client: Client, light_n: int, heavy_tokens: int, light_tokens: int
) -> tuple[dict[str, float], float, float]:
    """Each tenant's % of the slot time while both have work, the window (s), and the % of
    the slots busy in it."""
    heavy = [
        client.generate(MODEL, PROMPT, options=options(heavy_tokens), tenant="heavy")
        for _ in range(10 * light_n)
    ]
    light = [
        client.generate(MODEL, PROMPT, options=options(light_tokens), tenant="light")
        for _ in range(light_n)
    ]
    light_runs = [span(job.result(timeout=600)) for job in light]
    purge_model(client.redis, client.backend, MODEL, client.settings)
    heavy_runs = [span(job.result(timeout=120)) for job in started(client, heavy)]
    opened = submitted_at(client, light[-1])  # from here light has its whole backlog in
    closed = max(end for _, end in light_runs)
    slot_s = {
        name: sum(max(0.0, min(end, closed) - max(start, opened)) for start, end in runs)
        for name, runs in (("heavy", heavy_runs), ("light", light_runs))
    }
    total = sum(slot_s.values())
    shares = {name: 100 * seconds / total for name, seconds in slot_s.items()}
    return shares, closed - opened, 100 * total / (SLOTS * (closed - opened))


def span(result: Any) -> tuple[float, float]:
    return float(result.timings.started_at), float(result.timings.finished_at)


def submitted_at(client: Client, job: Job) -> float:
    return float(client.redis.hget(task_key(job.id), "submitted_at") or 0)


def started(client: Client, jobs: list[Job]) -> list[Job]:
    """The jobs not ended by a purge: they started, or were released to Celery and will."""
    pipe = client.redis.pipeline(transaction=False)
    for job in jobs:
        pipe.hget(task_key(job.id), "state")
    return [job for job, state in zip(jobs, pipe.execute(), strict=True) if state != b"cancelled"]
