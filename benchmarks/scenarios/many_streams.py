"""Many slow streams through one worker process: how many 30 tokens/s generations it relays
before subscribers fall behind.

For N = 50, 100, 200, 400, 800... concurrent generations (each ``num_predict`` = 30 tokens/s x
the stream's seconds, simulator ``--tokens-per-second 30``, ``NUM_PARALLEL`` and worker
``--slots`` as large as the largest N), a level is kept up with when the p99 subscriber lag is at
most 1 s and the worker used less than 95 % of a core. The lag of token k of a stream is its
receipt by the subscriber minus its generation time, the stream's first token time plus k / 30 s
(the simulator paces every token on that schedule; the first token's time is when the relaying
process read it: corral's ``first_token_at``, the bare relay's own clock). Each subject stops at
its first level that falls behind.

Subject: corral ``generate`` tasks, one ``corral worker`` process. Baseline: one process with a
thread per stream doing one ``PUBLISH`` per token (``benchmarks/bare_relay.py``). Both are read
by one pattern subscription in one thread of this process (hiredis parser), so the measuring
side is one connection; its CPU share is reported too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from benchmarks import bare_relay
from benchmarks.cpu import cpu_seconds
from benchmarks.registry import scenario
from benchmarks.stack import MODEL, REPO_ROOT, Context, Sim
from benchmarks.stats import Metrics, percentile, ratio
from tasks.events import TERMINAL_TYPES
from tasks.keys import stream_channel

TOKENS_PER_S = 30
MAX_LAG_S = 1.0
SATURATED_CORE = 0.95


@dataclass
class Received:
    """What one pattern subscription saw: per channel, (receipt time, payload) in order."""

    messages: dict[bytes, list[tuple[float, bytes]]] = field(default_factory=dict)
    ended: int = 0
    cpu_s: float = 0.0


class Subscriber(threading.Thread):
    """One pattern subscription, recording every message until ``streams`` have ended."""

    def __init__(self, redis_url: str, pattern: str, streams: int, is_end: Any) -> None:
        super().__init__(daemon=True, name="many-streams-subscriber")
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(pattern)
        self._pubsub.get_message(timeout=10)  # the subscription is in place before any submit
        self._streams = streams
        self._is_end = is_end
        self.received = Received()
        self.deadline = time.monotonic() + 3600

    def run(self) -> None:
        started = time.thread_time()
        messages = self.received.messages
        try:
            while self.received.ended < self._streams and time.monotonic() < self.deadline:
                message = self._pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                now = time.time()
                data = message["data"]
                messages.setdefault(message["channel"], []).append((now, data))
                if self._is_end(data):
                    self.received.ended += 1
        finally:
            self.received.cpu_s = time.thread_time() - started
            self._pubsub.close()
            self._client.close()


def corral_end(data: bytes) -> bool:
    """A terminal event; parses only the few messages that may be one."""
    maybe = any(f'"{kind}"'.encode() in data for kind in TERMINAL_TYPES)
    return maybe and json.loads(data)["type"] in TERMINAL_TYPES


def bare_end(data: bytes) -> bool:
    return data == b'{"type": "done"}'


def corral_lags(messages: list[tuple[float, bytes]]) -> tuple[list[float], int]:
    """Lag of every token of one corral stream, and its token count."""
    events = sorted(((json.loads(data), at) for at, data in messages), key=lambda e: e[0]["seq"])
    done = events[-1][0]
    if done["type"] != "done":
        raise RuntimeError(f"a stream ended with {done['type']}: {done}")
    first_at = done["result"]["timings"]["first_token_at"]
    tokens = [at for event, at in events if event["type"] == "token"]
    return [at - (first_at + k / TOKENS_PER_S) for k, at in enumerate(tokens)], len(tokens)


def bare_lags(messages: list[tuple[float, bytes]]) -> tuple[list[float], int]:
    lags = []
    for at, data in messages:
        event = json.loads(data)
        if "seq" in event:
            lags.append(at - (event["first_at"] + event["seq"] / TOKENS_PER_S))
    return lags, len(lags)


@dataclass
class Level:
    streams: int
    tokens: int  # relayed and received
    p99_lag_s: float
    max_lag_s: float
    relay_cpu_s: float
    window_s: float
    sim_cpu_s: float
    subscriber_cpu_s: float

    @property
    def cores(self) -> float:
        return self.relay_cpu_s / self.window_s

    @property
    def kept_up(self) -> bool:
        return self.p99_lag_s <= MAX_LAG_S and self.cores < SATURATED_CORE


def run_corral(ctx: Context, sim: Sim, worker_pid: int, streams: int, tokens: int) -> Level:
    client = ctx.client()
    subscriber = Subscriber(ctx.redis_url, stream_channel("*"), streams, corral_end)
    subscriber.start()
    before, sim_before = cpu_seconds(worker_pid), cpu_seconds(sim.child.pid)
    start = time.monotonic()
    options = {"num_predict": tokens, "temperature": 0}
    for n in range(streams):
        client.generate(MODEL, f"Stream {n}.", options=options)
    subscriber.deadline = time.monotonic() + tokens / TOKENS_PER_S * 4 + 120
    subscriber.join()
    window = time.monotonic() - start
    relay_cpu = cpu_seconds(worker_pid) - before
    return level(streams, subscriber, corral_lags, relay_cpu, window, sim, sim_before)


def run_bare(ctx: Context, sim: Sim, streams: int, tokens: int) -> Level:
    pattern = f"{bare_relay.CHANNEL_PREFIX}*"
    subscriber = Subscriber(ctx.redis_url, pattern, streams, bare_end)
    subscriber.start()
    sim_before = cpu_seconds(sim.child.pid)
    start = time.monotonic()
    argv = [sys.executable, "-m", "benchmarks.bare_relay", "--ollama", sim.url,
            "--redis", ctx.redis_url, "--model", MODEL, "--streams", str(streams),
            "--tokens", str(tokens)]  # fmt: skip
    subscriber.deadline = time.monotonic() + tokens / TOKENS_PER_S * 4 + 120
    out = subprocess.run(
        argv,
        env=ctx.child_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=tokens / TOKENS_PER_S * 4 + 120,
    )
    if out.returncode != 0:
        raise RuntimeError(f"bare relay failed:\n{out.stderr[-2000:]}")
    subscriber.join()
    window = time.monotonic() - start
    relay_cpu = json.loads(out.stdout.splitlines()[-1])["cpu_s"]
    return level(streams, subscriber, bare_lags, relay_cpu, window, sim, sim_before)


def level(
    streams: int,
    subscriber: Subscriber,
    lags_of: Any,
    relay_cpu: float,
    window: float,
    sim: Sim,
    sim_before: float,
) -> Level:
    received = subscriber.received
    if received.ended < streams:
        raise RuntimeError(f"{received.ended} of {streams} streams ended before the deadline")
    lags: list[float] = []
    tokens = 0
    for messages in received.messages.values():
        stream_lags, count = lags_of(messages)
        lags += stream_lags
        tokens += count
    return Level(
        streams=streams,
        tokens=tokens,
        p99_lag_s=percentile(lags, 99),
        max_lag_s=max(lags),
        relay_cpu_s=relay_cpu,
        window_s=window,
        sim_cpu_s=cpu_seconds(sim.child.pid) - sim_before,
        subscriber_cpu_s=received.cpu_s,
    )


@scenario(
    "many_streams",
    "concurrent 30 tokens/s streams through one worker: corral vs a bare PUBLISH relay",
    order=35,
)
def run(ctx: Context, metrics: Metrics) -> None:
    levels = [10, 20] if ctx.quick else [50, 100, 200, 400, 800, 1600]
    seconds = ctx.size(10, 2)
    tokens = seconds * TOKENS_PER_S
    top = max(levels)
    sim = ctx.simulator(
        "--tokens-per-second", str(TOKENS_PER_S), "--first-token-seconds", "0",
        "--num-parallel", str(top), "--max-queue", str(top * 2),
    )  # fmt: skip
    worker = ctx.corral_worker([MODEL], sim, slots=top)
    run_corral(ctx, sim, worker.pid, 2, TOKENS_PER_S)  # warm up: connections, threads
    for repeat in ctx.repeats(1):
        best = {"corral": 0, "bare": 0}
        behind: set[str] = set()
        for i, streams in enumerate(levels):
            order = ["corral", "bare"] if (i + repeat) % 2 == 0 else ["bare", "corral"]
            for name in order:
                if name in behind:
                    continue
                if name == "corral":
                    result = run_corral(ctx, sim, worker.pid, streams, tokens)
                else:
                    result = run_bare(ctx, sim, streams, tokens)
                record(metrics, name, result)
                ctx.log(
                    f"many_streams {name} N={streams}: p99 lag {result.p99_lag_s:.3f} s, "
                    f"max {result.max_lag_s:.3f} s, relay {result.cores:.2f} cores, "
                    f"{result.relay_cpu_s / result.tokens * 1e6:.0f} ms CPU/1k tokens, "
                    f"sim {result.sim_cpu_s / result.window_s:.2f} cores, "
                    f"subscriber {result.subscriber_cpu_s / result.window_s:.2f} cores"
                )
                if result.kept_up:
                    best[name] = streams
                else:
                    behind.add(name)
            if behind == {"corral", "bare"}:
                break
        metrics.add("corral largest N kept up", best["corral"], "streams")
        metrics.add("bare largest N kept up", best["bare"], "streams", "baseline")
        metrics.add(
            "corral/bare largest N kept up", ratio(best["corral"], best["bare"]), "x", "ratio"
        )
    add_ratios(metrics, levels)
    add_curves(metrics, levels)
    metrics.note(
        f"N streams of {tokens} tokens at {TOKENS_PER_S} tokens/s each, levels "
        f"{', '.join(map(str, levels))}; kept up: p99 lag <= {MAX_LAG_S:g} s and relay process "
        f"< {SATURATED_CORE:.0%} of a core; one corral worker --slots {top}, simulator "
        f"NUM_PARALLEL={top}; bare: a thread per stream, one PUBLISH per token; "
        "one pattern subscriber thread (hiredis) reads both"
    )


def record(metrics: Metrics, name: str, result: Level) -> None:
    kind = "value" if name == "corral" else "baseline"
    n = result.streams
    per_1k = result.relay_cpu_s / result.tokens * 1e6  # ms per 1,000 tokens
    metrics.add(f"{name} p99 lag @ {n}", result.p99_lag_s * 1000, "ms", kind)
    metrics.add(f"{name} CPU per 1k tokens @ {n}", per_1k, "ms", kind)
    metrics.add(f"{name} relay cores @ {n}", result.cores, "cores", kind)
    if name == "corral" and result.cores > 0:
        metrics.add(f"corral streams per worker core @ {n}", n / result.cores, "streams/core")


def add_ratios(metrics: Metrics, levels: list[int]) -> None:
    for n in levels:
        corral = metrics.series.get(f"corral CPU per 1k tokens @ {n}")
        bare = metrics.series.get(f"bare CPU per 1k tokens @ {n}")
        if corral and bare:
            for c, b in zip(corral.values, bare.values, strict=False):
                metrics.add(f"corral/bare CPU per 1k tokens @ {n}", ratio(c, b), "x", "ratio")


def add_curves(metrics: Metrics, levels: list[int]) -> None:
    for title, metric, unit in (
        ("p99 subscriber lag", "p99 lag", "ms"),
        ("relay CPU per 1,000 tokens", "CPU per 1k tokens", "ms"),
        ("relay process CPU", "relay cores", "cores"),
    ):
        metrics.curve(
            title,
            "concurrent streams (30 tokens/s each)",
            unit,
            {name: [(n, f"{name} {metric} @ {n}") for n in levels] for name in ("corral", "bare")},
            log_x=True,
        )
