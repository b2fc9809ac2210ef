"""Latency of one task at a time against a zero-delay simulator.

Three subjects, interleaved call by call (the order rotates every call): corral (submit, then
``result()``), a direct pooled ``requests`` call with ``stream: false``, and a bare Celery no-op
round trip on the same Redis. Also a bare Celery task making corral's streamed HTTP call, which
splits corral's cost into "Celery around an HTTP call" and "corral's own work".
"""

from __future__ import annotations

from typing import Any

import requests

from benchmarks import bare_celery
from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, interleaved, percentile, ratio

PROMPT = "Why is the sky blue?"
OPTIONS: dict[str, Any] = {"num_predict": 16, "temperature": 0}


def direct_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # as corral's pool does
    return session


@scenario("overhead", "one task at a time: corral vs direct HTTP vs bare Celery no-op", order=10)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    url = f"{stack.sim.url}/api/generate"
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "options": OPTIONS}
    session = direct_session()

    def corral() -> None:
        stack.client.generate(MODEL, PROMPT, options=OPTIONS).result(timeout=30)

    def direct() -> None:
        response = session.post(url, json={**body, "stream": False}, timeout=30)
        response.raise_for_status()
        response.json()

    def noop() -> None:
        stack.bare.send_task(bare_celery.NOOP, queue=bare_celery.QUEUE).get(timeout=30)

    def bare_http() -> None:
        stack.bare.send_task(bare_celery.HTTP, args=(url, body), queue=bare_celery.QUEUE).get(
            timeout=30
        )

    subjects = {"corral": corral, "direct": direct, "noop": noop, "bare_http": bare_http}
    calls = ctx.size(300, 30)
    for fn in subjects.values():  # warm the pools, the worker threads and the model
        for _ in range(ctx.size(20, 3)):
            fn()
    try:
        for repeat in ctx.repeats(5):
            samples = interleaved(subjects, calls, repeat)
            record(metrics, samples)
            ctx.log(
                f"overhead repeat {repeat + 1}: corral p50 "
                f"{percentile(samples['corral'], 50):.2f} ms"
            )
    finally:
        session.close()
    tokens = OPTIONS["num_predict"]
    metrics.note(
        f"{calls} calls per subject per repeat, interleaved; reply of {tokens} tokens; "
        f"worker threads --slots {stack.slots}"
    )


def record(metrics: Metrics, samples: dict[str, list[float]]) -> None:
    p = {name: (percentile(s, 50), percentile(s, 99)) for name, s in samples.items()}
    for name, kind in (
        ("corral", "value"),
        ("direct", "baseline"),
        ("noop", "baseline"),
        ("bare_http", "baseline"),
    ):
        metrics.add(f"{name} p50", p[name][0], "ms", kind)
        metrics.add(f"{name} p99", p[name][1], "ms", kind)
    for q, i in (("p50", 0), ("p99", 1)):
        metrics.add(f"corral/direct {q}", ratio(p["corral"][i], p["direct"][i]), "x", "ratio")
        metrics.add(f"corral/noop {q}", ratio(p["corral"][i], p["noop"][i]), "x", "ratio")
    metrics.add("corral/bare_http p50", ratio(p["corral"][0], p["bare_http"][0]), "x", "ratio")
    metrics.add("corral - direct p50", p["corral"][0] - p["direct"][0], "ms", "difference")
    metrics.add("corral - bare_http p50", p["corral"][0] - p["bare_http"][0], "ms", "difference")
