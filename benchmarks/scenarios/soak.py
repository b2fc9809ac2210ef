"""Memory over time: mixed work for ``--minutes`` (default 10; ``--quick`` 1), and the slope of
resident memory of every long-lived process after a warm-up.

``python -m benchmarks soak --minutes 20``; never part of a run that names no scenario.

The stack: a simulator at 20x Ollama's speed with 2 % of requests answered 500 (retried), one
``corral worker`` (threads, ``--slots 4``) for a text, a vision, an embedding model and one the
simulator lacks (every task there fails with ``ModelNotFound``), the HTTP gateway and the
exporter as processes of their own, the exporter scraped every second. Three driver threads go
round every kind through the SDK (results, token streams, a cancellation mid-stream, the failing
model) and through the gateway's Ollama facade (streamed generate, chat, embed).

Results, records and replay logs live 60 s here (``CORRAL_*_TTL_S``), so that what Redis holds
levels off inside the warm-up; with the defaults (a day) Redis grows by the records of a day's
tasks, by design. RSS is sampled every 5 s (the worker as its process tree, supervisor and
pool); the slope is a least-squares line through the one-minute means of the samples after the
warm-up (the first quarter of the run, at least two minutes when the run allows), in MiB per
minute, with twice its standard error as the noise, widened when neighbouring means move
together (:func:`benchmarks.stats.trend`). The slope through the last half of those means is
given too: growth that slows down (a heap settling) has a smaller one, a leak the same.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import requests

from benchmarks.cpu import rss_bytes
from benchmarks.registry import scenario
from benchmarks.stack import Context
from benchmarks.stats import Metrics, trend
from producers.cli.local_stack import Child
from producers.client import Client
from tasks.errors import CorralError, ModelNotFound, TaskCancelled
from workers.embedded_redis import free_port

MIB = 2**20
TEXT, VISION, EMBED, MISSING = "llama3.2:latest", "llava:7b", "all-minilm:latest", "soak-ghost:1b"
SHORT: dict[str, Any] = {"num_predict": 48, "temperature": 0}
LONG: dict[str, Any] = {"num_predict": 4000, "temperature": 0}  # cancelled long before its end
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
# A 1x1 red PNG: the multimodal task's image.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
TTL_S = "60"
SHORT_LIVED = {
    "CORRAL_RESULT_TTL_S": TTL_S,
    "CORRAL_STREAM_TTL_S": TTL_S,
    "CORRAL_BLOB_TTL_S": TTL_S,
}
DRIVERS = 3
SIM_ARGS = "--speed 0.05 --num-parallel 4 --max-loaded-models 4 --error-rate-500 0.02"


@scenario(
    "soak",
    "RSS slope of worker, gateway, exporter and Redis under mixed work (--minutes)",
    order=1000,
    default=False,
)
def run(ctx: Context, metrics: Metrics) -> None:
    minutes = ctx.minutes or (1.0 if ctx.quick else 10.0)
    total_s = minutes * 60
    warmup_s = min(max(total_s / 4, 120.0), total_s / 2)
    sample_s = 5.0 if total_s >= 300 else 1.0
    with short_lived_records():
        sim = ctx.simulator(*SIM_ARGS.split())
        worker = ctx.corral_worker([TEXT, VISION, EMBED, MISSING], sim, slots=4)
        gateway = start_http(ctx, "gateway", ["producers.cli", "gateway"], "/readyz")
        exporter = start_http(
            ctx, "exporter", ["monitoring.exporter", "--host", "127.0.0.1"], "/metrics"
        )
        client = ctx.client()
        processes = {
            "worker": worker.pid,
            "gateway": gateway.pid,
            "exporter": exporter.pid,
            "redis": redis_pid(ctx),
        }
        outcomes: Counter[str] = Counter()
        samples = drive(
            ctx,
            client,
            gateway.url,
            exporter.url,
            processes,
            outcomes,
            total_s=total_s,
            sample_s=sample_s,
        )
    report(metrics, samples, warmup_s, outcomes)
    missing = [name for name, _ in actions(client, gateway.url) if outcomes[name] == 0]
    if missing:
        raise RuntimeError(f"soak: no {', '.join(missing)} succeeded: {dict(outcomes)}")
    metrics.note(
        f"{minutes:g} min of mixed work, {DRIVERS} driver threads, warm-up {warmup_s / 60:.1f} "
        f"min, RSS every {sample_s:g} s; results, records and replay logs live {TTL_S} s; "
        "slope ± noise = least-squares MiB/min ± 2 standard errors through the one-minute "
        "means after the warm-up, widened when neighbouring means move together (NaN: too "
        "few independent means to tell); the last half: the same through the later half"
    )
    metrics.note("outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))


@contextmanager
def short_lived_records() -> Iterator[None]:
    """Every process of the scenario, and its client, keeps what it stores for TTL_S only."""
    saved = {name: os.environ.get(name) for name in SHORT_LIVED}
    os.environ.update(SHORT_LIVED)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Http(Child):
    """A child process serving HTTP at ``url``."""

    def __init__(self, process: subprocess.Popen[Any], url: str, log_path: Any) -> None:
        super().__init__(process, log_path)
        self.url = url


def start_http(ctx: Context, name: str, module_argv: list[str], ready_path: str) -> Http:
    """``python -m MODULE ... --port P`` with this run's Redis; returns once ``ready_path``
    answers 200."""
    port = free_port()
    log_path = ctx.workdir / f"{name}.log"
    argv = [sys.executable, "-m", *module_argv, "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env=ctx.child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    child = Http(process, f"http://127.0.0.1:{port}", log_path)
    ctx.on_exit(child.stop)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"the {name} exited at start:\n{child.log_tail()}")
        try:
            if requests.get(child.url + ready_path, timeout=2).status_code == 200:
                return child
        except requests.ConnectionError:
            time.sleep(0.1)  # not listening yet
    raise RuntimeError(f"the {name} did not answer {ready_path} in 60 s:\n{child.log_tail()}")


def redis_pid(ctx: Context) -> int:
    info = ctx.redis().info("server")
    return int(info["process_id"])


def actions(client: Client, gateway: str) -> list[tuple[str, Callable[[], None]]]:
    """One of everything; each raises on a wrong outcome."""
    http = requests.Session()
    http.trust_env = False

    def sdk_generate() -> None:
        client.generate(TEXT, "Name a harbour.", options=SHORT).result(timeout=60)

    def sdk_chat_stream() -> None:
        job = client.chat(TEXT, [{"role": "user", "content": "Count."}], options=SHORT)
        assert "".join(t for t in job.text_stream(timeout=60) if isinstance(t, str))

    def sdk_structured() -> None:
        client.structured(TEXT, SCHEMA, prompt="A number.").result(timeout=60)

    def sdk_multimodal() -> None:
        client.multimodal(VISION, "What colour?", [PIXEL], options=SHORT).result(timeout=60)

    def sdk_embed() -> None:
        client.embed(EMBED, ["tide", "harbour", "sail"]).result(timeout=60)

    def sdk_missing_model() -> None:
        try:
            client.generate(MISSING, "Hello?").result(timeout=60)
        except ModelNotFound:
            return
        raise AssertionError(f"{MISSING} answered")

    def sdk_cancel_mid_stream() -> None:
        job = client.generate(TEXT, "A long story.", options=LONG)
        stream = job.text_stream(timeout=60)
        next(stream)  # the first token: it is running
        job.cancel()
        try:
            for _ in stream:
                pass
        except TaskCancelled:
            return
        raise AssertionError("the cancelled stream ended without TaskCancelled")

    def facade_generate_stream() -> None:
        body: dict[str, Any] = {"model": TEXT, "prompt": "Hi", "options": SHORT}
        with http.post(f"{gateway}/api/generate", json=body, stream=True, timeout=60) as reply:
            reply.raise_for_status()
            assert sum(1 for line in reply.iter_lines() if line) > 1

    def facade_chat() -> None:
        body: dict[str, Any] = {"model": TEXT, "messages": [{"role": "user", "content": "Hi"}]}
        body.update(stream=False, options=SHORT)
        reply = http.post(f"{gateway}/api/chat", json=body, timeout=60)
        reply.raise_for_status()
        assert reply.json()["done"] is True

    def facade_embed() -> None:
        reply = http.post(
            f"{gateway}/api/embed", json={"model": EMBED, "input": ["a", "b"]}, timeout=60
        )
        reply.raise_for_status()
        assert len(reply.json()["embeddings"]) == 2

    return [
        (f.__name__, f)
        for f in (
            sdk_generate,
            sdk_chat_stream,
            sdk_structured,
            sdk_multimodal,
            sdk_embed,
            sdk_missing_model,
            sdk_cancel_mid_stream,
            facade_generate_stream,
            facade_chat,
            facade_embed,
        )
    ]


Samples = dict[str, list[tuple[float, float]]]


def drive(
    ctx: Context,
    client: Client,
    gateway: str,
    exporter: str,
    processes: dict[str, int],
    outcomes: Counter[str],
    *,
    total_s: float,
    sample_s: float,
) -> Samples:
    """Run the drivers and the scraper for ``total_s``; sample RSS (MiB) every ``sample_s``."""
    started = time.monotonic()
    end = started + total_s
    stop = threading.Event()
    lock = threading.Lock()

    def count(name: str) -> None:
        with lock:
            outcomes[name] += 1

    def driver(offset: int) -> None:
        todo = actions(client, gateway)
        i = offset
        # At least one round of everything, however short the run.
        while (time.monotonic() < end and not stop.is_set()) or i - offset < len(todo):
            name, action = todo[i % len(todo)]
            i += 1
            try:
                action()
                count(name)
            except (CorralError, requests.RequestException) as exc:  # counted, not fatal
                count(f"{name} failed ({type(exc).__name__})")

    def scraper() -> None:
        while not stop.wait(1.0):
            try:
                requests.get(f"{exporter}/metrics", timeout=10).raise_for_status()
                count("scrapes")
            except requests.RequestException as exc:
                count(f"scrapes failed ({type(exc).__name__})")

    threads = [threading.Thread(target=driver, args=(n * 3,), daemon=True) for n in range(DRIVERS)]
    threads.append(threading.Thread(target=scraper, daemon=True))
    for thread in threads:
        thread.start()
    samples: Samples = {name: [] for name in [*processes, "redis used_memory"]}
    redis = ctx.redis()
    last_log = started
    try:
        while (now := time.monotonic()) < end:
            minute = (now - started) / 60
            for name, pid in processes.items():
                samples[name].append((minute, rss_bytes(pid) / MIB))
            used = int(redis.info("memory")["used_memory"])
            samples["redis used_memory"].append((minute, used / MIB))
            if now - last_log >= 60:
                last_log = now
                rss = ", ".join(f"{n} {s[-1][1]:.1f}" for n, s in samples.items())
                ctx.log(f"soak: minute {minute:.0f}: MiB {rss}; {sum(outcomes.values())} done")
            time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
        redis.close()
    return samples


def report(metrics: Metrics, samples: Samples, warmup_s: float, outcomes: Counter[str]) -> None:
    """Per process: RSS after warm-up and at the end, the slope after warm-up and its noise.

    The line goes through the means of consecutive windows (a minute each, at least six
    windows), not through the raw samples: neighbouring samples move together (a burst of work,
    a garbage collection), and a fit to them would call that drift significant.
    """
    warmup_min = warmup_s / 60
    for name, series in samples.items():
        after = [(x, y) for x, y in series if x >= warmup_min]
        span = after[-1][0] - after[0][0] if len(after) > 1 else 0.0
        means = window_means(after, min(1.0, span / 6) or 1.0)
        line = trend([x for x, _ in means], [y for _, y in means])
        metrics.add(f"{name} MiB after warm-up", after[0][1] if after else float("nan"), "MiB")
        metrics.add(f"{name} MiB at end", series[-1][1], "MiB")
        metrics.add(f"{name} slope after warm-up", line.slope, "MiB/min", "difference")
        metrics.add(f"{name} slope noise (2 SE)", 2 * line.stderr, "MiB/min")
        late = means[len(means) // 2 :]
        late_line = trend([x for x, _ in late], [y for _, y in late])
        metrics.add(f"{name} slope in the last half", late_line.slope, "MiB/min", "difference")
        metrics.add(f"{name} last-half noise (2 SE)", 2 * late_line.stderr, "MiB/min")
    failed = sum(v for k, v in outcomes.items() if "failed" in k)
    done = sum(v for k, v in outcomes.items() if "failed" not in k and k != "scrapes")
    metrics.add("actions completed", done, "actions")
    metrics.add("actions failed (errors beyond the expected ones)", failed, "actions")


def window_means(points: list[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """The mean ``(x, y)`` of each run of ``points`` ``width`` wide in ``x``."""
    windows: dict[int, list[tuple[float, float]]] = {}
    start = points[0][0] if points else 0.0
    for x, y in points:
        windows.setdefault(int((x - start) // width), []).append((x, y))
    return [
        (sum(x for x, _ in w) / len(w), sum(y for _, y in w) / len(w))
        for _, w in sorted(windows.items())
    ]
