"""Token streaming: a 2,000-token generation at an unlimited token rate.

Corral: submit, then read ``job.text_stream()`` (replay log, then pub/sub) until the end.
Direct: POST ``stream: true`` to the simulator and parse every NDJSON line, as a client of
Ollama would. Noop: a bare Celery no-op round trip on the same Redis. Both stream clocks start
before the submit (or the POST). Reported: end-to-end tokens/s (the generation's tokens / time to
the last piece of text), the time to the first token, and the ratios; the time to the first
token is also set against its floor, a no-op round trip plus the direct time to the first token.

Corral may hand several tokens over in one piece (they arrive faster than a Redis round trip),
so its tokens are the direct stream's: its text must be exactly the direct stream's text.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from benchmarks import bare_celery
from benchmarks.registry import scenario
from benchmarks.scenarios.overhead import direct_session
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, median_of, ratio

PROMPT = "Tell me a long story."
NOOPS_PER_STREAM = 3


@scenario("stream", "a long generation: SDK text_stream() vs reading Ollama's NDJSON", order=30)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    tokens = ctx.size(2000, 300)
    options: dict[str, Any] = {"num_predict": tokens, "temperature": 0}
    url = f"{stack.sim.url}/api/generate"
    session = direct_session()

    def corral() -> Sample:
        start = time.perf_counter()
        first = last = 0.0
        pieces = []
        for piece in stack.client.generate(MODEL, PROMPT, options=options).text_stream(timeout=120):
            if piece:
                last = time.perf_counter()
                first = first or last
                pieces.append(piece)
        return Sample(first - start, last - start, "".join(pieces), len(pieces))

    def direct() -> Sample:
        start = time.perf_counter()
        first = last = 0.0
        pieces = []
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": PROMPT,
            "options": options,
            "stream": True,
        }
        with session.post(url, json=body, stream=True, timeout=120) as response:
            response.raise_for_status()
            for line in response.iter_lines(chunk_size=65536):
                if line and (piece := json.loads(line).get("response")):
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(piece)
        return Sample(first - start, last - start, "".join(pieces), len(pieces))

    def noop() -> float:
        start = time.perf_counter()
        stack.bare.send_task(bare_celery.NOOP, queue=bare_celery.QUEUE).get(timeout=30)
        return time.perf_counter() - start

    subjects = {"corral": corral, "direct": direct}
    for fn in subjects.values():
        fn()  # warm-up
    for _ in range(NOOPS_PER_STREAM):
        noop()
    streams = ctx.size(5, 2)
    try:
        for repeat in ctx.repeats(5):
            runs: dict[str, list[Sample]] = {name: [] for name in subjects}
            noops: list[float] = []
            for i in range(streams):
                order = list(subjects) if (i + repeat) % 2 == 0 else list(reversed(subjects))
                for name in order:
                    runs[name].append(subjects[name]())
                noops += [noop() for _ in range(NOOPS_PER_STREAM)]
            record(metrics, runs, noops, tokens)
            ctx.log(
                f"stream repeat {repeat + 1}: corral "
                f"{metrics.series['corral tokens/s'].values[-1]:,.0f} tokens/s"
            )
    finally:
        session.close()
    metrics.note(
        f"{tokens} tokens per generation, {streams} generations per subject and "
        f"{streams * NOOPS_PER_STREAM} no-ops per repeat, interleaved (median taken within the "
        "repeat), simulator --no-delay"
    )


@dataclass(frozen=True)
class Sample:
    """One stream: seconds to its first and last piece of text, the text, how many pieces."""

    first_s: float
    last_s: float
    text: str
    pieces: int


def record(
    metrics: Metrics, runs: dict[str, list[Sample]], noops: list[float], tokens: int
) -> None:
    expected = runs["direct"][0]
    if expected.pieces < tokens:
        raise RuntimeError(f"direct received {expected.pieces} of {tokens} tokens")
    summary = {}
    for name, samples in runs.items():
        for sample in samples:
            if sample.text != expected.text:
                raise RuntimeError(f"{name} received another text than the direct stream")
        ttft_ms = median_of([s.first_s * 1000 for s in samples])
        rate = median_of([expected.pieces / s.last_s for s in samples])
        kind = "value" if name == "corral" else "baseline"
        metrics.add(f"{name} tokens/s", rate, "tokens/s", kind)
        metrics.add(f"{name} time to first token", ttft_ms, "ms", kind)
        summary[name] = (rate, ttft_ms)
    pieces = median_of([s.pieces for s in runs["corral"]])
    metrics.add("corral tokens per piece", expected.pieces / pieces, "tokens", "value")
    noop_ms = median_of([s * 1000 for s in noops])
    metrics.add("bare Celery no-op round trip", noop_ms, "ms", "baseline")
    floor_ms = noop_ms + summary["direct"][1]
    metrics.add(
        "corral/direct tokens/s", ratio(summary["corral"][0], summary["direct"][0]), "x", "ratio"
    )
    metrics.add(
        "corral/direct time to first token",
        ratio(summary["corral"][1], summary["direct"][1]),
        "x",
        "ratio",
    )
    metrics.add(
        "corral time to first token/(no-op + direct)",
        ratio(summary["corral"][1], floor_ms),
        "x",
        "ratio",
    )
    metrics.add(
        "corral - direct time to first token",
        summary["corral"][1] - summary["direct"][1],
        "ms",
        "difference",
    )
