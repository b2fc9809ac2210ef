"""Delivery under failure: how fast a cancel reaches Ollama, how fast a killed worker's task
comes back.

- **cancel**: a generation at 50 tokens/s is cancelled after its fifth token; the figure is the
  time from ``job.cancel()`` until the simulator logs the dropped connection. The baseline is
  a direct client closing its own stream (the floor: nothing but the socket close).
- **recovery**: the worker running a long generation is SIGKILLed while a second worker is
  idle; the figure is the time from the kill until the task starts again on the other worker,
  with the default visibility timeout (20 s; bare Celery on Redis waits 3600 s). The quick
  run uses a 3 s timeout.
"""

from __future__ import annotations

import time
from typing import Any

import requests

from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context, Sim
from benchmarks.stats import Metrics
from producers.cli.local_stack import start_worker
from tasks.settings import Settings
from workers.processes import Child

TOKENS_PER_S = "50"


def wait_disconnect(sim: Sim, since: int, timeout_s: float = 20) -> float:
    """Unix time of the simulator's first ``disconnect`` event after ``since``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = requests.get(
            f"{sim.url}/_sim/events", params={"since": since, "wait": 5}, timeout=15
        ).json()
        for event in page["events"]:
            if event["type"] == "disconnect":
                return float(event["t"])
        since = page["next"]
    raise TimeoutError("the simulator saw no disconnect")


def events_next(sim: Sim) -> int:
    return int(requests.get(f"{sim.url}/_sim/events", timeout=10).json()["next"])


@scenario("delivery", "cancel → Ollama sees the close; kill -9 → task runs again", order=80)
def run(ctx: Context, metrics: Metrics) -> None:
    sim = ctx.simulator("--tokens-per-second", TOKENS_PER_S, "--first-token-seconds", "0",
                        "--load-seconds", "0", "--num-parallel", "2")  # fmt: skip
    visibility_s = 3 if ctx.quick else Settings.model_fields["visibility_timeout_s"].default
    env = {"CORRAL_VISIBILITY_TIMEOUT_S": str(visibility_s)}
    workers: dict[str, Child] = {}  # by Celery node name
    for index in (1, 2):
        name = f"delivery-{index}@localhost"
        child = start_worker(
            [MODEL],
            redis_url=ctx.redis_url,
            ollama_host=sim.url,
            name=name,
            env=env,
            log_path=ctx.workdir / f"delivery-{index}.log",
        )
        ctx.on_exit(child.stop)
        workers[name] = child
    client = ctx.client()
    session = requests.Session()
    ctx.on_exit(session.close)
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "a long essay",
        "options": {"num_predict": 2000},
    }

    for _ in ctx.repeats(5, 2):
        job = client.generate(MODEL, "a long essay", options={"num_predict": 2000})
        for count, _token in enumerate(e for e in job.stream(timeout=60) if e["type"] == "token"):
            if count >= 4:
                break
        since = events_next(sim)
        started = time.time()
        job.cancel()
        cancel_s = wait_disconnect(sim, since) - started
        with session.post(f"{sim.url}/api/generate", json=body, stream=True, timeout=30) as reply:
            lines = reply.iter_lines()
            for _ in range(5):
                next(lines)
            since = events_next(sim)
            started = time.time()
        direct_s = wait_disconnect(sim, since) - started
        metrics.add("cancel → Ollama sees the close", cancel_s * 1000, "ms")
        metrics.add("direct close → Ollama sees it", direct_s * 1000, "ms", kind="baseline")
        metrics.add("cancel added", (cancel_s - direct_s) * 1000, "ms", kind="difference")

    job = client.generate(MODEL, "survive a crash", options={"num_predict": 3000})
    start = next(e for e in job.stream(timeout=60) if e["type"] == "start")
    victim = workers[start["worker"]]
    killed_at = time.time()
    victim.kill()
    restarted = next(
        e
        for e in job.stream(timeout=visibility_s * 3 + 60, after_seq=start["seq"])
        if e["type"] == "start"
    )
    metrics.add("kill → task restarted", restarted["at"] - killed_at, "s")
    metrics.add("visibility timeout", float(visibility_s), "s")
    job.cancel()
    ctx.log(f"delivery: visibility timeout {visibility_s} s; bare Celery default 3600 s")
