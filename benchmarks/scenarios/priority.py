"""Does interactive work overtake a batch backlog? Priority 9 against 2,000 priority-0 tasks.

One model with two slots and a fixed speed (100 tokens/s, 20 tokens a task), so one task's
service time is known: about 0.22 s. A batch of 2,000 priority-0 tasks is admitted first; then,
while it drains, priority-9 tasks arrive one at a time at random intervals (0.1 to 0.5 s).
Each priority-9 task's wait is read from its task record: ``started_at`` (written by the worker
as it takes the task's lease) minus ``submitted_at`` (written by the producer at submission).
The service time is the median run of those same tasks (their results' ``finished_at`` minus
``started_at``). Goal: the p99 wait at most 2x the service time, the time for a busy slot to
free. Without priorities the wait would be the whole backlog (2,000 x 0.22 s / 2 slots).

What is left of the backlog afterwards is purged; a run never drains it.
"""

from __future__ import annotations

import random
import time
from typing import Any

from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, percentile, ratio
from producers.client import Client
from producers.jobs import Job
from tasks.keys import task_key
from tasks.queues import purge_model

SLOTS = 2
TOKENS_PER_S = 100.0
PROMPT = "Summarise this support ticket."


@scenario("priority", "priority-9 tasks under a 2,000-task priority-0 backlog: wait p99", order=52)
def run(ctx: Context, metrics: Metrics) -> None:
    sim = ctx.simulator(*timed_simulator(SLOTS))
    ctx.corral_worker([MODEL], sim, slots=SLOTS)
    client = ctx.client()
    backlog = ctx.size(2000, 60)
    urgent = ctx.size(100, 6)
    options: dict[str, Any] = {"num_predict": ctx.size(20, 10), "temperature": 0}
    client.generate(MODEL, PROMPT, options=options).result(timeout=60)  # load the model
    rng = random.Random(13)
    for repeat in ctx.repeats(3, 1):
        for _ in range(backlog):
            client.generate(MODEL, PROMPT, options=options, priority=0)
        depth_before = client.scheduler.pending_counts([MODEL])[MODEL]
        jobs = []
        for _ in range(urgent):
            time.sleep(rng.uniform(0.1, 0.5))  # arrivals, not a wait for an event
            jobs.append(client.generate(MODEL, PROMPT, options=options, priority=9))
        depth_after = client.scheduler.pending_counts([MODEL])[MODEL]
        runs = [run_s(job.result(timeout=120)) for job in jobs]
        waits = [w * 1000 for w in record_waits(client, jobs)]
        purge_model(client.redis, client.backend, MODEL, client.settings)
        service_ms = percentile(runs, 50) * 1000
        p99 = percentile(waits, 99)
        metrics.add("priority-9 wait p50", percentile(waits, 50), "ms")
        metrics.add("priority-9 wait p99", p99, "ms")
        metrics.add("priority-9 wait max", max(waits), "ms")
        metrics.add("service time", service_ms, "ms", "baseline")
        metrics.add("pending at the first priority-9 submit", depth_before, "tasks", "baseline")
        metrics.add("pending at the last priority-9 submit", depth_after, "tasks", "baseline")
        metrics.add("priority-9 wait p99 / service time", ratio(p99, service_ms), "x", "ratio")
        ctx.log(
            f"priority repeat {repeat + 1}: wait p50 {percentile(waits, 50):.0f} ms, "
            f"p99 {p99:.0f} ms, service {service_ms:.0f} ms, backlog {depth_before}->{depth_after}"
        )
    metrics.note(
        f"{backlog} priority-0 tasks admitted, then {urgent} priority-9 tasks 0.1-0.5 s apart; "
        f"{options['num_predict']} tokens at {TOKENS_PER_S:g} tokens/s, worker --slots {SLOTS}; "
        "wait = record started_at - submitted_at; goal: p99 <= 2x service time"
    )


def timed_simulator(slots: int) -> list[str]:
    """Simulator arguments for a known service time: a fixed speed, no load time."""
    return ["--num-parallel", str(slots), "--tokens-per-second", str(TOKENS_PER_S),
            "--first-token-seconds", "0.02", "--load-seconds", "0"]  # fmt: skip


def run_s(result: Any) -> float:
    """A task's run, from its result: the worker's clock from start to finish."""
    timings = result.timings
    return float(timings.finished_at - timings.started_at)


def record_waits(client: Client, jobs: list[Job]) -> list[float]:
    """Submit-to-start of each task, from its record (both times written as they happened)."""
    pipe = client.redis.pipeline(transaction=False)
    for job in jobs:
        pipe.hmget(task_key(job.id), "submitted_at", "started_at")
    waits = []
    for job, (submitted, started) in zip(jobs, pipe.execute(), strict=True):
        if submitted is None or started is None:
            raise RuntimeError(f"task {job.id} has no submitted_at/started_at in its record")
        waits.append(float(started) - float(submitted))
    return waits
