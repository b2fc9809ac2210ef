"""Cost per task as work grows: 10^2, 10^4 and 10^5 tasks pending, over 1, 10 and 50 models.

For M models, one ``corral worker`` serves M model queues (``--slots 4``, zero-delay simulator
with every model resident). A backlog of P tasks is admitted, spread evenly over M other models
that the simulator lists (so admission accepts them) but no worker serves, so they stay pending
in the scheduler's structures beside the measured ones, as behind a paused worker. The backlog
goes through the same admission script as ``Client.submit``, pipelined a thousand at a time
(task record and admission; not the per-task release attempt and sent event; Celery builds one
message per model, the rest are copies under their own ids). Then measured tasks, one at a time
and round-robin over the M served models, go through the public ``Client.generate``
(admission, release, the worker's start and finish) and ``result()``. Reported for each
(P, M): submit to start p50 (the result's ``queue_wait_s``), and worker plus redis-server CPU
per measured task, with ratios against P = 10^2, M = 1.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any

from benchmarks.cpu import cpu_seconds
from benchmarks.registry import scenario
from benchmarks.stack import Context
from benchmarks.stats import Metrics, percentile, ratio
from monitoring.snapshot import RedisSnapshot
from producers.client import Client
from tasks.keys import queue_name, task_key
from tasks.kinds import registry
from tasks.payloads import dump_payload, validate_payload
from tasks.registry import live_workers
from tasks.scheduler import DEFAULT_PRIORITY, DEFAULT_TENANT, ReadyMessage

OPTIONS: dict[str, Any] = {"num_predict": 1, "temperature": 0}
PIPELINE = 1000  # backlog admissions per round trip
DEPTH_ENV = "CORRAL_MAX_QUEUE_DEPTH"


def served_name(i: int) -> str:
    return f"served{i}:latest"


def backlog_name(i: int) -> str:
    return f"waiting{i}:latest"


def sim_config(models: int) -> dict[str, Any]:
    names = [served_name(i) for i in range(models)] + [backlog_name(i) for i in range(models)]
    return {
        "no_delay": True,
        "num_parallel": 4,
        "max_loaded_models": len(names),
        "models": [{"name": name, "capabilities": ["completion"]} for name in names],
    }


def admit_backlog(client: Client, models: list[str], count: int) -> None:
    """Admit ``count`` generate tasks over ``models`` as ``Client.submit`` does (task record,
    then the admission script), pipelined. Celery builds one message per model (about 2 ms
    each); the others are copies of it under their own task id and delivery tag."""
    task_name = registry.get("generate").task_name
    scheduler = client.scheduler
    templates = {}
    for model in models:
        data = {"model": model, "prompt": "Wait.", "options": OPTIONS}
        payload = dump_payload(validate_payload("generate", data, client.settings))
        kwargs = {"payload": payload, "submitted_at": time.time(), "deadline_s": None}
        templates[model] = client.builder.build(
            task_name, kwargs=kwargs, task_id=str(uuid.uuid4()), queue=queue_name(model)
        )
    done = 0
    while done < count:
        pipe = client.redis.pipeline(transaction=False)
        for i in range(done, min(count, done + PIPELINE)):
            model = models[i % len(models)]
            message = copy_message(templates[model])
            now = time.time()
            record: list[str | float] = ["kind", "generate", "model", model, "queue", message.queue,
                      "submitted_at", now, "priority", DEFAULT_PRIORITY,
                      "tenant", DEFAULT_TENANT, "state", "queued"]  # fmt: skip
            pipe.hset(task_key(message.task_id), items=record)
            args = scheduler._admit_args(message, model, now, DEFAULT_TENANT, DEFAULT_PRIORITY, now)
            scheduler._admit(args=args, client=pipe)
        for reply in pipe.execute()[1::2]:
            if reply[0] != b"admitted":
                raise RuntimeError(f"a backlog task was not admitted: {reply}")
        done = min(count, done + PIPELINE)


def copy_message(template: ReadyMessage) -> ReadyMessage:
    """``template`` under a new task id and delivery tag (both UUIDs, unique in the text)."""
    task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
    raw = template.raw.replace(template.task_id, task_id).replace(template.delivery_tag, tag)
    return dataclasses.replace(template, task_id=task_id, raw=raw, delivery_tag=tag, events=())


def measure(
    ctx: Context, client: Client, models: list[str], worker_pid: int, tasks: int
) -> tuple[float, float, float]:
    """Submit to start p50 (ms), worker and Redis CPU per task (µs)."""
    if ctx.redis_server.process is None:
        raise RuntimeError("redis-server is not running")
    redis_pid = ctx.redis_server.process.pid
    waits = []
    worker_before, redis_before = cpu_seconds(worker_pid), cpu_seconds(redis_pid)
    for i in range(tasks):
        result = client.generate(models[i % len(models)], "Hi.", options=OPTIONS).result(60)
        wait_s = result.timings.queue_wait_s
        if wait_s is None:
            raise RuntimeError(f"task {result.task_id} has no start or submit time")
        waits.append(wait_s * 1000)
    worker_us = (cpu_seconds(worker_pid) - worker_before) / tasks * 1e6
    redis_us = (cpu_seconds(redis_pid) - redis_before) / tasks * 1e6
    return percentile(waits, 50), worker_us, redis_us


@scenario("scale", "cost per task with 10^2..10^5 tasks pending over 1..50 models", order=95)
def run(ctx: Context, metrics: Metrics) -> None:
    backlogs = [10, 100, 1000] if ctx.quick else [100, 10_000, 100_000]
    model_counts = [1, 3] if ctx.quick else [1, 10, 50]
    tasks = ctx.size(300, 30)
    saved = os.environ.get(DEPTH_ENV)
    os.environ[DEPTH_ENV] = str(max(backlogs) * 2)  # one model may hold the whole backlog
    try:
        for repeat in ctx.repeats(1):
            for m in model_counts:
                with ctx.scope():
                    run_models(ctx, metrics, m, backlogs, tasks, repeat)
    finally:
        if saved is None:
            os.environ.pop(DEPTH_ENV)
        else:
            os.environ[DEPTH_ENV] = saved
    base = f"{backlogs[0]} pending, {model_counts[0]} model(s)"
    top = f"{backlogs[-1]} pending, {model_counts[-1]} model(s)"
    for metric in ("submit to start p50", "worker + Redis CPU/task", "Redis CPU/task"):
        tops, bases = metrics.series[f"{metric} @ {top}"], metrics.series[f"{metric} @ {base}"]
        for t, b in zip(tops.values, bases.values, strict=True):
            metrics.add(f"{metric}: {top} / {base}", ratio(t, b), "x", "ratio")
    for title, metric, unit in (
        ("submit to start p50", "submit to start p50", "ms"),
        ("worker + Redis CPU per task", "worker + Redis CPU/task", "µs"),
        ("worker CPU per task", "worker CPU/task", "µs"),
        ("Redis CPU per task", "Redis CPU/task", "µs"),
        ("exporter discovery (every 10 s)", "exporter discovery", "ms"),
        ("exporter read per scrape, p50", "exporter read p50", "ms"),
        ("live_workers(): the releasers' plan, every 5 s per process", "live_workers()", "ms"),
    ):
        metrics.curve(
            title,
            "tasks pending",
            unit,
            {
                f"{m} model(s)": [(p, f"{metric} @ {p} pending, {m} model(s)") for p in backlogs]
                for m in model_counts
            },
            log_x=True,
        )
    metrics.note(
        f"{tasks} measured generate tasks (1 token) per point, one at a time, round-robin over "
        "the served models; the backlog pending on as many other models, admitted by the same "
        "admission script, never released (no worker serves them); one worker --slots 4, "
        f"zero-delay simulator; {DEPTH_ENV}={max(backlogs) * 2}"
    )


def run_models(
    ctx: Context, metrics: Metrics, m: int, backlogs: list[int], tasks: int, repeat: int
) -> None:
    served = [served_name(i) for i in range(m)]
    waiting = [backlog_name(i) for i in range(m)]
    sim = ctx.simulator(config=sim_config(m))
    worker = ctx.corral_worker(served, sim, slots=4)
    client = ctx.client()
    measure(ctx, client, served, worker.pid, min(tasks, 4 * m))  # warm up: every model loaded
    pending = 0
    for p in backlogs:
        started = time.monotonic()
        admit_backlog(client, waiting, p - pending)
        admitting = time.monotonic() - started
        pending = p
        wait_ms, worker_us, redis_us = measure(ctx, client, served, worker.pid, tasks)
        discover_ms, read_ms = exporter_read(ctx)
        scan_ms = live_workers_ms(ctx)
        at = f"@ {p} pending, {m} model(s)"
        metrics.add(f"live_workers() {at}", scan_ms, "ms")
        metrics.add(f"exporter discovery {at}", discover_ms, "ms")
        metrics.add(f"exporter read p50 {at}", read_ms, "ms")
        metrics.add(f"submit to start p50 {at}", wait_ms, "ms")
        metrics.add(f"worker CPU/task {at}", worker_us, "µs")
        metrics.add(f"Redis CPU/task {at}", redis_us, "µs")
        metrics.add(f"worker + Redis CPU/task {at}", worker_us + redis_us, "µs")
        ctx.log(
            f"scale repeat {repeat + 1}, {m} model(s), {p} pending (admitted in "
            f"{admitting:.1f} s): submit to start p50 {wait_ms:.2f} ms, worker {worker_us:.0f} "
            f"µs/task, Redis {redis_us:.0f} µs/task; exporter discovery {discover_ms:.1f} ms, "
            f"read {read_ms:.2f} ms; live_workers() {scan_ms:.1f} ms"
        )


def live_workers_ms(ctx: Context) -> float:
    """One ``live_workers()`` (each releaser's plan, every 5 s in every process), ms."""
    client = ctx.redis()
    try:
        started = time.perf_counter()
        live_workers(client)
        return (time.perf_counter() - started) * 1000
    finally:
        client.close()


def exporter_read(ctx: Context) -> tuple[float, float]:
    """The exporter's discovery (workers, queues and hosts, every 10 s) and one scrape's read,
    in ms. Its start, which also indexes what older data holds, is not part of either."""
    client = ctx.redis()
    now = [time.time()]
    try:
        snapshot = RedisSnapshot(client, max_age_s=0, discover_every_s=10, clock=lambda: now[0])
        snapshot.get()  # the exporter's start
        reads = []
        for _ in range(20):
            started = time.perf_counter()
            snapshot.get()
            reads.append((time.perf_counter() - started) * 1000)
        now[0] += 10
        started = time.perf_counter()
        snapshot.get()  # discovery, then a read
        first = (time.perf_counter() - started) * 1000
    finally:
        client.close()
    read = percentile(reads, 50)
    return max(0.0, first - read), read
