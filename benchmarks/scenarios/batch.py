"""A batch of chat lines against the same tasks submitted one by one through the SDK.

Both run N chat requests on the zero-delay simulator with the same worker: the batch through
``Client.batch`` (read, check, submit with idempotency keys, collect the output lines) until it
completes, the other as N ``client.chat`` calls, then every result. The rate is lines / (end -
first submit); the two alternate which goes first. The batch reader's peak RSS for a large
file is measured by ``python -m benchmarks.batch_reader_rss`` (docs/batches.md).

Then, on a simulator that takes time per token (a line is a task of about 100 ms, the same as
an interactive one), interactive chat tasks (priority 5) are submitted one at a time while a
batch (priority 2) keeps every slot busy: their time from submit to start (the worker's
``start`` event) against one task's service time (start to end, measured alone first); the goal
is p99 <= 2x. Each of them names a callback URL, served by a receiver in this process: the
figure is the webhook's arrival after the task's terminal event entered its log.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, percentile, ratio
from producers import Batch, Client, Job
from producers.batches import DEFAULT_OWNER, batch_id_of
from tasks.batches import describe
from tasks.errors import TaskNotFound
from tasks.events import TERMINAL_TYPES
from tasks.keys import log_key
from tasks.settings import load_settings

MESSAGES = [{"role": "user", "content": "Name a colour."}]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the Standard Webhooks specification's example
TOKENS = 20  # per task in the interactive phase: 100 ms at 200 tokens/s
SLOTS = 4  # the interactive phase's worker and simulator
BUSY_MODEL = "qwen2.5-coder:7b"  # served only by that worker, not by the standard stack's


@scenario(
    "batch",
    "a batch vs the same tasks one by one; interactive waits and webhooks beside a batch",
    order=85,
)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    count = ctx.size(10_000, 100)
    folder = Path(tempfile.mkdtemp(prefix="corral-bench-batch-"))
    client = Client(settings=stack.client.settings.model_copy(update={"batch_dir": folder}))
    ctx.on_exit(client.close)

    def batch(n: int, repeat: int) -> None:
        path = write_batch(folder / f"in-{repeat}-{n}.jsonl", n, 16)
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
    interactive(ctx, metrics, folder)


def write_batch(path: Path, n: int, max_tokens: int, model: str = MODEL) -> Path:
    with open(path, "w") as out:
        for i in range(n):
            body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "seed": i}
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            out.write(json.dumps({**line, "body": body}) + "\n")
    return path


class Arrivals(BaseHTTPRequestHandler):
    """Records when each webhook arrived, by its ``webhook-id``."""

    arrived: dict[str, float] = {}

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        at = time.time()
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.arrived[self.headers["webhook-id"]] = at
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def events(client: Client, task_id: str) -> list[dict[str, Any]]:
    """The task's log: each event with ``logged_at``, when Redis stored it (its entry id)."""
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.redis.xrange(log_key(task_id)))
    return [
        {**json.loads(f[b"e"]), "logged_at": int(i.decode().split("-")[0]) / 1000}
        for i, f in entries
    ]


def busy_batch(ctx: Context, folder: Path, path: Path, key: str, client: Client) -> Batch:
    """``corral batch submit --wait`` in a process of its own, as a batch job runs beside
    interactive clients; returns once every line is submitted."""
    env = {**ctx.child_env(), "CORRAL_BATCH_DIR": str(folder)}
    argv = [sys.executable, "-m", "producers.cli", "batch", "submit", str(path)]
    with open(ctx.workdir / f"{key}.log", "w") as log:
        child = subprocess.Popen(
            [*argv, "--key", key, "--wait"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    ctx.on_exit(child.kill)
    batch = Batch(client, batch_id_of(DEFAULT_OWNER, key, describe(path).file_id))
    deadline = time.monotonic() + 600
    while True:
        with contextlib.suppress(TaskNotFound):  # not created yet
            if batch.info().status != "validating":
                return batch
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the batch was not submitted: see {log.name}")
        time.sleep(0.05)


def interactive(ctx: Context, metrics: Metrics, folder: Path) -> None:
    """Interactive tasks' wait for a slot while a batch fills every slot; their webhooks."""
    sim = ctx.simulator("--tokens-per-second", "200", "--first-token-seconds", "0",
                        "--load-seconds", "0", "--num-parallel", str(SLOTS))  # fmt: skip
    hooks = {"CORRAL_WEBHOOK_SECRET": SECRET, "CORRAL_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    ctx.corral_worker([BUSY_MODEL], sim, slots=SLOTS, env=hooks)
    settings = load_settings(
        redis_url=ctx.redis_url,
        batch_dir=folder,
        webhook_secret=SECRET,
        webhook_allowed_hosts="127.0.0.1",
    )
    client = Client(settings=settings)
    ctx.on_exit(client.close)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Arrivals)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx.on_exit(server.server_close)
    ctx.on_exit(server.shutdown)
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    options = {"num_predict": TOKENS}

    def run_alone(i: int) -> float:
        job = client.chat(BUSY_MODEL, MESSAGES, options={**options, "seed": i})
        job.result(timeout=60)
        log = events(client, job.id)
        start = next(e for e in log if e["type"] == "start")
        return next(e for e in log if e["type"] in TERMINAL_TYPES)["logged_at"] - start["at"]

    for repeat in ctx.repeats(2, 1):
        service = [run_alone(i) for i in range(ctx.size(40, 10))]
        lines = ctx.size(3000, 200)
        path = write_batch(folder / f"busy-{repeat}.jsonl", lines, TOKENS, BUSY_MODEL)
        batch = busy_batch(ctx, folder, path, f"busy-{repeat}", client)
        probes: list[tuple[float, Job]] = []
        while len(probes) < ctx.size(150, 15) and batch.info().done < 0.9 * lines:
            submitted = time.time()
            job = client.chat(BUSY_MODEL, MESSAGES, options=options, callback_url=hook_url)
            probes.append((submitted, job))
            job.result(timeout=60)
            time.sleep(0.1)  # the next probe finds the batch in the slots again
        info = batch.wait(timeout=3600)
        if info.status != "completed":
            raise RuntimeError(f"the busy batch ended {info.status}")
        waits, lags = [], []
        deadline = time.monotonic() + 30
        while len(Arrivals.arrived) < len(probes) and time.monotonic() < deadline:
            time.sleep(0.05)
        for submitted, job in probes:
            log = events(client, job.id)
            waits.append(next(e for e in log if e["type"] == "start")["at"] - submitted)
            arrived = Arrivals.arrived.get(f"msg_{job.id}")
            if arrived is not None:
                lags.append(arrived - log[-1]["logged_at"])
        if len(lags) < len(probes):
            raise RuntimeError(f"{len(probes) - len(lags)} webhooks did not arrive in 30 s")
        Arrivals.arrived.clear()
        service_s = percentile(service, 50)
        wait_p99 = percentile(waits, 99)
        metrics.add("task service time p50", service_s * 1000, "ms", kind="baseline")
        metrics.add("interactive submit → start p50", percentile(waits, 50) * 1000, "ms")
        metrics.add("interactive submit → start p99", wait_p99 * 1000, "ms")
        metrics.add("interactive p99 wait / service time", ratio(wait_p99, service_s), "x", "ratio")
        metrics.add("webhook after terminal event p50", percentile(lags, 50) * 1000, "ms")
        metrics.add("webhook after terminal event p99", percentile(lags, 99) * 1000, "ms")
        worst = ", ".join(f"{w * 1000:.0f}" for w in sorted(waits)[-3:])
        ctx.log(
            f"batch interactive repeat {repeat + 1}: {len(probes)} probes, wait p99 "
            f"{wait_p99 * 1000:.0f} ms (worst {worst} ms), service {service_s * 1000:.0f} ms, "
            f"webhook p50 {percentile(lags, 50) * 1000:.0f} ms"
        )
    metrics.note(
        f"interactive: chat tasks of {TOKENS} tokens at 200 tokens/s, one at a time, while a "
        f"batch of such lines fills one worker's {SLOTS} slots (goal: p99 wait <= "
        "2x one task's service time); each names a callback URL on a local receiver"
    )
