"""Token streaming: a 2,000-token generation at an unlimited token rate.

Corral: submit, then read ``job.text_stream()`` (replay log, then pub/sub) until the end.
Direct: POST ``stream: true`` to the simulator and parse every NDJSON line, as a client of
Ollama would. Both clocks start before the submit (or the POST). Reported: end-to-end tokens/s
(tokens / time to the last token), the time to the first token, and the ratios.
"""

from __future__ import annotations

import json
import time
from typing import Any

from benchmarks.registry import scenario
from benchmarks.scenarios.overhead import direct_session
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, median_of, ratio

PROMPT = "Tell me a long story."


@scenario("stream", "a long generation: SDK text_stream() vs reading Ollama's NDJSON", order=30)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    tokens = ctx.size(2000, 300)
    options: dict[str, Any] = {"num_predict": tokens, "temperature": 0}
    url = f"{stack.sim.url}/api/generate"
    session = direct_session()

    def corral() -> tuple[float, float, int]:
        start = time.perf_counter()
        first = 0.0
        count = 0
        for piece in stack.client.generate(MODEL, PROMPT, options=options).text_stream(timeout=120):
            if piece:
                count += 1
                first = first or time.perf_counter()
        return first - start, time.perf_counter() - start, count

    def direct() -> tuple[float, float, int]:
        start = time.perf_counter()
        first = 0.0
        count = 0
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": PROMPT,
            "options": options,
            "stream": True,
        }
        with session.post(url, json=body, stream=True, timeout=120) as response:
            response.raise_for_status()
            for line in response.iter_lines(chunk_size=65536):
                if line and json.loads(line).get("response"):
                    count += 1
                    first = first or time.perf_counter()
        return first - start, time.perf_counter() - start, count

    subjects = {"corral": corral, "direct": direct}
    for fn in subjects.values():
        fn()  # warm-up
    streams = ctx.size(5, 2)
    try:
        for repeat in ctx.repeats(5):
            runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in subjects}
            for i in range(streams):
                order = list(subjects) if (i + repeat) % 2 == 0 else list(reversed(subjects))
                for name in order:
                    runs[name].append(subjects[name]())
            record(metrics, runs, tokens)
            ctx.log(
                f"stream repeat {repeat + 1}: corral "
                f"{metrics.series['corral tokens/s'].values[-1]:,.0f} tokens/s"
            )
    finally:
        session.close()
    metrics.note(
        f"{tokens} tokens per generation, {streams} generations per subject per repeat "
        "(median taken within the repeat), simulator --no-delay"
    )


def record(metrics: Metrics, runs: dict[str, list[tuple[float, float, int]]], tokens: int) -> None:
    summary = {}
    for name, samples in runs.items():
        received = min(count for _, _, count in samples)
        if received < tokens:
            raise RuntimeError(f"{name} received {received} of {tokens} tokens")
        ttft_ms = median_of([first * 1000 for first, _, _ in samples])
        rate = median_of([count / total for _, total, count in samples])
        kind = "value" if name == "corral" else "baseline"
        metrics.add(f"{name} tokens/s", rate, "tokens/s", kind)
        metrics.add(f"{name} time to first token", ttft_ms, "ms", kind)
        summary[name] = (rate, ttft_ms)
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
        "corral - direct time to first token",
        summary["corral"][1] - summary["direct"][1],
        "ms",
        "difference",
    )
