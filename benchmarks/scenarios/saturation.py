"""Does the queue keep Ollama busy? A model with NUM_PARALLEL=4 at 20 ms per token.

With a backlog waiting, the fraction of time all four slots are busy is read from the
simulator's ``/_sim/stats`` over a window that opens when all four slots are first busy and
closes when the backlog is gone (the queue is empty, or every request has been sent). The goal
for corral (worker ``--slots 4``) is at least 95 %. The baseline is four direct client threads
sending back-to-back streamed requests: the best a closed loop can do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.registry import scenario
from benchmarks.scenarios.overhead import direct_session
from benchmarks.stack import MODEL, Context, Sim
from benchmarks.stats import Metrics, ratio
from tasks.keys import queue_name
from tasks.queues import queue_depths

SLOTS = 4
TOKENS_PER_S = 50.0  # 20 ms per token
PROMPT = "Summarise the plot of a novel."


@scenario("saturation", "backlog on a 4-slot model: fraction of time all slots are busy", order=40)
def run(ctx: Context, metrics: Metrics) -> None:
    sim = ctx.simulator("--num-parallel", str(SLOTS), "--tokens-per-second", str(TOKENS_PER_S),
                        "--first-token-seconds", "0.05", "--load-seconds", "0.5")  # fmt: skip
    ctx.corral_worker([MODEL], sim, slots=SLOTS)
    client = ctx.client()
    redis = ctx.redis()
    tasks = ctx.size(40, 12)
    options: dict[str, Any] = {"num_predict": ctx.size(50, 10), "temperature": 0}

    def corral() -> dict[str, float]:
        jobs = [client.generate(MODEL, PROMPT, options=options) for _ in range(tasks)]
        queue = [queue_name(MODEL)]
        window = busy_window(sim, lambda: queue_depths(redis, queue)[0].waiting > 0)
        for job in jobs:
            job.result(timeout=300)
        return window

    def direct() -> dict[str, float]:
        left = [tasks]
        lock = threading.Lock()
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": PROMPT,
            "options": options,
            "stream": True,
        }

        def client_thread() -> None:
            session = direct_session()
            while True:
                with lock:
                    if left[0] == 0:
                        break
                    left[0] -= 1
                with session.post(
                    f"{sim.url}/api/generate", json=body, stream=True, timeout=300
                ) as response:
                    for _ in response.iter_lines():
                        pass
            session.close()

        threads = [threading.Thread(target=client_thread) for _ in range(SLOTS)]
        for thread in threads:
            thread.start()
        try:
            return busy_window(sim, lambda: left[0] > 0)
        finally:
            for thread in threads:
                thread.join()

    client.generate(MODEL, PROMPT, options=options).result(timeout=60)  # load the model
    for repeat in ctx.repeats(3):
        order = [("corral", corral), ("direct", direct)]
        windows = {name: fn() for name, fn in (order if repeat % 2 == 0 else order[::-1])}
        for name, w in windows.items():
            kind = "value" if name == "corral" else "baseline"
            metrics.add(f"{name} all slots busy", w["all_busy"] * 100, "% of window", kind)
            metrics.add(f"{name} slot utilisation", w["utilisation"] * 100, "% of window", kind)
            metrics.add(f"{name} window", w["window_s"], "s", kind)
        metrics.add(
            "corral/direct all slots busy",
            ratio(windows["corral"]["all_busy"], windows["direct"]["all_busy"]),
            "x",
            "ratio",
        )
        ctx.log(
            f"saturation repeat {repeat + 1}: corral {windows['corral']['all_busy']:.1%}, "
            f"direct {windows['direct']['all_busy']:.1%}"
        )
    metrics.note(
        f"{tasks} tasks of {options['num_predict']} tokens, "
        f"{1000 / TOKENS_PER_S:g} ms per token, NUM_PARALLEL={SLOTS}, "
        f"worker --slots {SLOTS}; goal: corral >= 95%"
    )


def busy_window(sim: Sim, backlog: Callable[[], bool], timeout_s: float = 300) -> dict[str, float]:
    """Stats deltas from "all slots busy" to "backlog gone", on the simulator's own clock."""
    deadline = time.monotonic() + timeout_s
    while True:
        start = sim.stats()
        if model_stats(start)["busy_slots"] >= SLOTS:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("the model never had all its slots busy")
        time.sleep(0.01)
    while backlog():
        if time.monotonic() > deadline:
            raise TimeoutError("the backlog did not drain")
        time.sleep(0.02)
    end = sim.stats()
    a, b = model_stats(start), model_stats(end)
    window = end["uptime_s"] - start["uptime_s"]
    return {
        "window_s": window,
        "all_busy": ratio(b["all_slots_busy_seconds"] - a["all_slots_busy_seconds"], window),
        "utilisation": ratio(b["busy_slot_seconds"] - a["busy_slot_seconds"], window * SLOTS),
    }


def model_stats(snapshot: dict[str, Any]) -> dict[str, Any]:
    return snapshot["models"][MODEL]
