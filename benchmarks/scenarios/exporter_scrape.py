"""What a Prometheus scrape costs Redis: the exporter's snapshot read against one PING.

Ten model queues hold 50 real corral messages each (submitted through the SDK for models an
Ollama host lists, as admission requires, but no worker serves, so none is consumed). The
exporter reads queue depths, oldest ages, unacked and dead-letter counts in one pipelined round
trip; the figure is its time and Redis command count, next to a PING.
"""

from __future__ import annotations

import time

from benchmarks.registry import scenario
from benchmarks.stack import Context
from benchmarks.stats import Metrics, percentile, ratio
from monitoring.snapshot import RedisSnapshot
from tasks.scheduler.served import note_offered

QUEUES = 10


@scenario("exporter_scrape", "the exporter's Redis read per scrape vs one PING", order=90)
def run(ctx: Context, metrics: Metrics) -> None:
    client = ctx.client()
    models = [f"scrape-{index}" for index in range(QUEUES)]
    note_offered(client.redis, {"models": [{"name": m} for m in models]})
    per_queue = ctx.size(50, 5)
    for model in models:
        for _ in range(per_queue):
            client.generate(model, "waiting")
    redis = ctx.redis()
    snapshot = RedisSnapshot(redis, max_age_s=0, discover_every_s=3600)
    snapshot.get()  # discovery happens once here
    for _ in ctx.repeats(5, 2):
        reads, pings = [], []
        for _ in range(ctx.size(200, 20)):
            started = time.perf_counter()
            taken = snapshot.get()
            reads.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            redis.ping()
            pings.append((time.perf_counter() - started) * 1000)
        metrics.add("snapshot read p50", percentile(reads, 50), "ms")
        metrics.add("PING p50", percentile(pings, 50), "ms", "baseline")
        metrics.add(
            "snapshot/PING p50", ratio(percentile(reads, 50), percentile(pings, 50)), "x", "ratio"
        )
        metrics.add("Redis commands per read", float(taken.commands), "commands")
    ctx.log(f"exporter_scrape: {QUEUES} queues x {per_queue} waiting messages")
