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

import contextlib
import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
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
SUBMITTERS = 8
# The simulator's tokens: a punctuation mark, or a word with its leading space.
SIM_TOKEN = re.compile(r"[.,?!:;]|\s*[^\s.,?!:;]+")


@dataclass
class Received:
    """What one pattern subscription saw: per channel, (receipt time, payload) in order."""

    messages: dict[bytes, list[tuple[float, bytes]]] = field(default_factory=dict)
    ended_channels: set[bytes] = field(default_factory=set)
    repeated_ends: list[bytes] = field(default_factory=list)  # a second terminal event
    cpu_s: float = 0.0

    @property
    def ended(self) -> int:
        return len(self.ended_channels)


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
                    channel = message["channel"]
                    if channel in self.received.ended_channels:
                        self.received.repeated_ends.append(channel)
                    self.received.ended_channels.add(channel)
        finally:
            self.received.cpu_s = time.thread_time() - started
            self._pubsub.close()
            self._client.close()


def corral_end(data: bytes) -> bool:
    """A terminal event; parses only the few messages that may be one."""
    maybe = any(f'"{kind}"'.encode() in data for kind in TERMINAL_TYPES)
    return maybe and json.loads(data)["type"] in TERMINAL_TYPES


def outline(messages: list[tuple[float, bytes]]) -> str:
    """A stream's events as received, for an error: (seq, type) each, in order of receipt."""
    events = [json.loads(data) for _, data in messages]
    return ", ".join(f"{e.get('seq')}:{e.get('type')}" for e in events)


def bare_end(data: bytes) -> bool:
    return data == b'{"type": "done"}'


def corral_tokens(messages: list[tuple[float, bytes]]) -> list[tuple[float, float]]:
    """(receipt, lag) of every token of one corral stream. An event carries the text of every
    token that arrived while the one before it was being written: each of its tokens counts,
    received with it (counting events instead would take token k for an earlier one)."""
    events = sorted(((json.loads(data), at) for at, data in messages), key=lambda e: e[0]["seq"])
    done = events[-1][0]
    if done["type"] != "done":
        raise RuntimeError(f"a stream ended with {done['type']}: {outline(messages)}")
    first_at = done["result"]["timings"]["first_token_at"]
    tokens = [
        at
        for event, at in events
        if event["type"] == "token"
        for _ in SIM_TOKEN.findall(event["text"])
    ]
    expected = done["result"]["metrics"]["eval_count"]
    if len(tokens) != expected:
        raise RuntimeError(f"counted {len(tokens)} tokens in a stream of {expected}")
    return [(at, at - (first_at + k / TOKENS_PER_S)) for k, at in enumerate(tokens)]


def bare_tokens(messages: list[tuple[float, bytes]]) -> list[tuple[float, float]]:
    out = []
    for at, data in messages:
        event = json.loads(data)
        if "seq" in event:
            out.append((at, at - (event["first_at"] + event["seq"] / TOKENS_PER_S)))
    return out


class CpuSampler(threading.Thread):
    """CPU seconds of process trees, sampled against the wall clock until stopped."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.25) -> None:
        super().__init__(daemon=True, name="many-streams-cpu")
        self.pids = pids
        self.every_s = every_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._halt = threading.Event()
        self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                self.samples[name].append((time.time(), cpu_seconds(pid)))

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def used(self, name: str, start: float, end: float) -> float:
        """CPU seconds ``name`` used between two wall-clock times (interpolated)."""
        return self._at(name, end) - self._at(name, start)

    def _at(self, name: str, when: float) -> float:
        points = self.samples[name]
        for (t0, c0), (t1, c1) in itertools.pairwise(points):
            if t0 <= when <= t1:
                return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1
        return points[-1][1] if when > points[-1][0] else points[0][1]


@dataclass
class Level:
    """One level's figures, over the window in which all N streams were running."""

    streams: int
    window_s: float  # all N streams running at once (0: never)
    peak: int  # most streams running at once
    tokens: int  # received in the window
    p99_lag_s: float
    max_lag_s: float
    relay_cpu_s: float
    sim_cpu_s: float
    subscriber_cores: float

    @property
    def cores(self) -> float:
        return self.relay_cpu_s / self.window_s if self.window_s else math.nan

    @property
    def ms_per_1k_tokens(self) -> float:
        return self.relay_cpu_s / self.tokens * 1e6 if self.tokens else math.nan

    def kept_up(self, min_window_s: float) -> bool:
        return (
            self.window_s >= min_window_s
            and self.p99_lag_s <= MAX_LAG_S
            and self.cores < SATURATED_CORE
        )


def run_corral(ctx: Context, sim: Sim, worker_pid: int, streams: int, tokens: int) -> Level:
    client = ctx.client()
    subscriber = Subscriber(ctx.redis_url, stream_channel("*"), streams, corral_end)
    subscriber.deadline = time.monotonic() + tokens / TOKENS_PER_S * 4 + 300
    subscriber.start()
    sampler = CpuSampler({"relay": worker_pid, "sim": sim.child.pid})
    sampler.start()
    options = {"num_predict": tokens, "temperature": 0}
    with ThreadPoolExecutor(SUBMITTERS) as pool:  # submitting is not the ramp's bottleneck
        list(pool.map(lambda n: client.generate(MODEL, f"Stream {n}.", options=options),
                      range(streams)))  # fmt: skip
    subscriber.join()
    sampler.stop()
    return level(streams, subscriber, corral_tokens, sampler)


def run_bare(ctx: Context, sim: Sim, streams: int, tokens: int) -> Level:
    pattern = f"{bare_relay.CHANNEL_PREFIX}*"
    subscriber = Subscriber(ctx.redis_url, pattern, streams, bare_end)
    subscriber.deadline = time.monotonic() + tokens / TOKENS_PER_S * 4 + 300
    subscriber.start()
    argv = [sys.executable, "-m", "benchmarks.bare_relay", "--ollama", sim.url,
            "--redis", ctx.redis_url, "--model", MODEL, "--streams", str(streams),
            "--tokens", str(tokens)]  # fmt: skip
    relay = subprocess.Popen(
        argv, env=ctx.child_env(), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    ctx.on_exit(relay.kill)
    sampler = CpuSampler({"relay": relay.pid, "sim": sim.child.pid})
    sampler.start()
    subscriber.join()
    sampler.stop()
    _, errors = relay.communicate(timeout=60)
    if relay.returncode != 0:
        raise RuntimeError(f"bare relay failed:\n{errors[-2000:]}")
    return level(streams, subscriber, bare_tokens, sampler)


def level(
    streams: int,
    subscriber: Subscriber,
    tokens_of: Callable[[list[tuple[float, bytes]]], list[tuple[float, float]]],
    sampler: CpuSampler,
) -> Level:
    received = subscriber.received
    if received.ended < streams:
        raise RuntimeError(f"{received.ended} of {streams} streams ended before the deadline")
    if received.repeated_ends:
        channel = received.repeated_ends[0]
        raise RuntimeError(
            f"{len(received.repeated_ends)} streams ended twice; the first, {channel!r}: "
            f"{outline(received.messages[channel])}"
        )
    per_stream = [tokens_of(messages) for messages in received.messages.values()]
    per_stream = [t for t in per_stream if t]
    spans = [(t[0][0], t[-1][0]) for t in per_stream]
    start, end = max(s for s, _ in spans), min(e for _, e in spans)
    window = max(0.0, end - start)
    inside = [lag for t in per_stream for at, lag in t if start <= at <= end]
    lags = inside if window else [lag for t in per_stream for _, lag in t]
    return Level(
        streams=streams,
        window_s=window,
        peak=peak_overlap(spans),
        tokens=len(inside) if window else 0,
        p99_lag_s=percentile(lags, 99),
        max_lag_s=max(lags),
        relay_cpu_s=sampler.used("relay", start, end) if window else math.nan,
        sim_cpu_s=sampler.used("sim", start, end) if window else math.nan,
        subscriber_cores=received.cpu_s / max(1e-9, spans_length(spans)),
    )


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def spans_length(spans: list[tuple[float, float]]) -> float:
    return max(e for _, e in spans) - min(s for s, _ in spans)


@scenario(
    "many_streams",
    "concurrent 30 tokens/s streams through one worker: corral vs a bare PUBLISH relay",
    order=35,
)
def run(ctx: Context, metrics: Metrics) -> None:
    levels = [10, 20] if ctx.quick else [50, 100, 200, 400, 800, 1600]
    seconds = ctx.size(30, 4)
    tokens = seconds * TOKENS_PER_S
    min_window_s = seconds / 3  # all N running at once for a third of a stream's life
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
                    f"many_streams {name} N={streams}: all running for {result.window_s:.1f} s "
                    f"(peak {result.peak}), p99 lag {result.p99_lag_s:.3f} s, max "
                    f"{result.max_lag_s:.3f} s, relay {result.cores:.2f} cores, "
                    f"{result.ms_per_1k_tokens:.0f} ms CPU/1k tokens, sim "
                    f"{result.sim_cpu_s / max(result.window_s, 1e-9):.2f} cores, subscriber "
                    f"{result.subscriber_cores:.2f} cores"
                )
                if result.kept_up(min_window_s):
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
        f"{', '.join(map(str, levels))}; figures over the window in which all N ran at once; "
        f"kept up: that window >= {min_window_s:.1f} s, p99 lag <= {MAX_LAG_S:g} s and relay "
        f"process < {SATURATED_CORE:.0%} of a core; one corral worker --slots {top}, simulator "
        f"NUM_PARALLEL={top}; bare: a thread per stream, one PUBLISH per token; "
        "one pattern subscriber thread (hiredis) reads both"
    )


def record(metrics: Metrics, name: str, result: Level) -> None:
    kind = "value" if name == "corral" else "baseline"
    n = result.streams
    metrics.add(f"{name} p99 lag @ {n}", result.p99_lag_s * 1000, "ms", kind)
    metrics.add(f"{name} peak concurrent @ {n}", result.peak, "streams", kind)
    if not result.window_s:
        return  # the N streams never all ran at once: no steady figures
    metrics.add(f"{name} CPU per 1k tokens @ {n}", result.ms_per_1k_tokens, "ms", kind)
    metrics.add(f"{name} relay cores @ {n}", result.cores, "cores", kind)
    # What a whole core would relay at this CPU per token (the level's N, when it kept up).
    per_core = 1e6 / (TOKENS_PER_S * result.ms_per_1k_tokens)
    metrics.add(f"{name} streams per relay core @ {n}", per_core, "streams/core", kind)


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
        ("streams per relay core (goal for corral: >= 500)", "streams per relay core", "streams"),
    ):
        metrics.curve(
            title,
            "concurrent streams (30 tokens/s each)",
            unit,
            {name: [(n, f"{name} {metric} @ {n}") for n in levels] for name in ("corral", "bare")},
            log_x=True,
        )
