"""A batch of chat lines against the same tasks submitted one by one through the SDK.

Both run N chat requests on the zero-delay simulator with the same worker: the batch through
``Client.batch`` (read, check, submit with idempotency keys, collect the output lines) until it
completes, the other as N ``client.chat`` calls, then every result. The rate is lines / (end -
first submit); the two alternate which goes first. The batch reader's peak RSS for a large
file is measured by ``python -m benchmarks.batch_reader_rss`` (docs/batches.md).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, ratio
from producers import Client

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@scenario("batch", "a batch of chat lines vs the same tasks submitted one by one", order=85)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    count = ctx.size(10_000, 100)
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-batch-"))
    client = Client(settings=stack.client.settings.model_copy(update={"batch_dir": folder}))
    ctx.on_exit(client.close)

    def batch(n: int, repeat: int) -> None:
        path = folder / f"in-{repeat}-{n}.jsonl"
        with open(path, "w") as out:
            for i in range(n):
                body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "seed": i}
                line = {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
                out.write(json.dumps(line) + "\n")
        info = client.batch(path, key=f"bench-{repeat}").wait(timeout=3600)
        if info.status != "completed" or info.completed != n:
            raise RuntimeError(f"the batch ended {info.status} with {info.completed}/{n} lines")

    def one_by_one(n: int, repeat: int) -> None:
        options = {"num_predict": 16}
        jobs = [client.chat(MODEL, MESSAGES, options={**options, "seed": i}) for i in range(n)]
        for job in jobs:
            job.result(timeout=3600)

    batch(ctx.size(50, 10), -1)  # warm up both paths
    one_by_one(ctx.size(50, 10), -1)
    subjects = {"batch": batch, "one by one": one_by_one}
    for repeat in ctx.repeats(2):
        order = ["batch", "one by one"] if repeat % 2 == 0 else ["one by one", "batch"]
        rates = {}
        for name in order:
            started = time.perf_counter()
            subjects[name](count, repeat)
            rates[name] = count / (time.perf_counter() - started)
            metrics.add(f"{name} lines/s", rates[name], "lines/s")
        metrics.add(
            "batch/one-by-one lines/s", ratio(rates["batch"], rates["one by one"]), "x", "ratio"
        )
        ctx.log(
            f"batch repeat {repeat + 1}: batch {rates['batch']:.0f} lines/s, one by one "
            f"{rates['one by one']:.0f}/s"
        )
    metrics.note(
        f"{count} chat lines per subject per repeat, 16 tokens each; one worker, "
        f"--slots {stack.slots}; the batch includes reading, checking and writing "
        "its output"
    )
