"""Tasks per second with thousands in flight, one worker process, zero-delay simulator.

Corral's generate tasks against a bare Celery task making the same streamed HTTP call with the
same pool, concurrency, prefetch and events. Each subject submits everything first, then
collects every result; the rate is tasks / (last result - first submit). The two alternate
which goes first in each repeat. CPU per task (worker process, redis-server, simulator, this
client) is read with psutil over the same window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from benchmarks import bare_celery
from benchmarks.cpu import cpu_used
from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context, Standard
from benchmarks.stats import Metrics, ratio

PROMPT = "Name a colour."
OPTIONS: dict[str, Any] = {"num_predict": 16, "temperature": 0}


@scenario("throughput", "thousands of tasks in flight: corral vs bare Celery HTTP task", order=20)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    url = f"{stack.sim.url}/api/generate"
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "options": OPTIONS}
    count = ctx.size(5000, 200)

    def corral(n: int) -> None:
        jobs = [stack.client.generate(MODEL, PROMPT, options=OPTIONS) for _ in range(n)]
        for job in jobs:
            job.result(timeout=600)

    def bare(n: int) -> None:
        results = [
            stack.bare.send_task(bare_celery.HTTP, args=(url, body), queue=bare_celery.QUEUE)
            for _ in range(n)
        ]
        for result in results:
            result.get(timeout=600)

    corral(ctx.size(50, 10))  # warm up both paths
    bare(ctx.size(50, 10))
    subjects = {"corral": (corral, stack.worker.pid), "bare": (bare, stack.bare_worker.pid)}
    for repeat in ctx.repeats(3):
        order = ["corral", "bare"] if repeat % 2 == 0 else ["bare", "corral"]
        rates = {}
        for name in order:
            fn, worker_pid = subjects[name]
            rates[name] = measure(metrics, name, fn, count, stack, worker_pid, ctx)
        metrics.add("corral/bare tasks/s", ratio(rates["corral"], rates["bare"]), "x", "ratio")
        ctx.log(
            f"throughput repeat {repeat + 1}: corral {rates['corral']:.0f}/s, "
            f"bare {rates['bare']:.0f}/s"
        )
    for part in ("worker", "redis", "client"):
        corral_s, bare_s = (
            metrics.series[f"corral CPU/task {part}"],
            metrics.series[f"bare CPU/task {part}"],
        )
        for c, b in zip(corral_s.values, bare_s.values, strict=True):
            metrics.add(f"corral/bare CPU/task {part}", ratio(c, b), "x", "ratio")
    metrics.note(
        f"{count} tasks in flight per subject per repeat; one worker process, threads, "
        f"--slots {stack.slots}; reply of {OPTIONS['num_predict']} tokens"
    )


def measure(
    metrics: Metrics,
    name: str,
    fn: Callable[[int], None],
    count: int,
    stack: Standard,
    worker_pid: int,
    ctx: Context,
) -> float:
    if ctx.redis_server.process is None:
        raise RuntimeError("redis-server is not running")
    pids = {"worker": worker_pid, "redis": ctx.redis_server.process.pid, "sim": stack.sim.child.pid}
    with cpu_used(pids) as used:
        start = time.perf_counter()
        fn(count)
        elapsed = time.perf_counter() - start
    kind = "value" if name == "corral" else "baseline"
    metrics.add(f"{name} tasks/s", count / elapsed, "tasks/s", kind)
    for part, seconds in used.items():
        metrics.add(f"{name} CPU/task {part}", seconds / count * 1e6, "µs", kind)
    ctx.flush_results()  # results and logs of this batch; queues are empty by now
    return count / elapsed
