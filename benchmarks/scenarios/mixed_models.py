"""Mixed models on one Ollama that holds one model at a time: what model-aware dispatch is worth.

Three models, MAX_LOADED_MODELS=1, a 2 s load time, 20 ms per token, NUM_PARALLEL=2, and
requests interleaved across the models (a, b, c, a, b, c, ...). Two ways to run them, each
from a fresh simulator state (``/_sim/reset``):

- naive: six concurrent direct clients taking requests in arrival order;
- corral: everything submitted at once, one worker per model with ``--slots 2`` (also six
  requests in flight at most).

Reported: the makespan (first submit to last result) and the number of model loads. The three
workers share the simulator's host, so the scheduler keeps it on its loaded model while that
model has work (docs/scheduling.md, "Model affinity"); the naive clients load on nearly every
request.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from benchmarks.registry import scenario
from benchmarks.scenarios.overhead import direct_session
from benchmarks.stack import Context, Sim
from benchmarks.stats import Metrics, ratio

MODELS = ("alpha:latest", "bravo:latest", "charlie:latest")
SLOTS = 2
CLIENTS = 6
PROMPT = "Classify this ticket."


def sim_config(load_s: float) -> dict[str, object]:
    spec = {
        "capabilities": ["completion"],
        "load_s": load_s,
        "tokens_per_s": 50.0,
        "first_token_s": 0.05,
    }
    return {
        "num_parallel": SLOTS,
        "max_loaded_models": 1,
        "models": [{"name": name, **spec} for name in MODELS],
    }


@scenario("mixed_models", "3 models, 1 resident: naive direct clients vs corral workers", order=50)
def run(ctx: Context, metrics: Metrics) -> None:
    load_s = 2.0 if not ctx.quick else 0.2  # quick runs check the plumbing, not the figure
    sim = ctx.simulator(config=sim_config(load_s))
    for model in MODELS:
        ctx.corral_worker([model], sim, slots=SLOTS)
    client = ctx.client()
    count = ctx.size(90, 9)
    options: dict[str, Any] = {"num_predict": ctx.size(15, 5), "temperature": 0}
    arrivals = [MODELS[i % len(MODELS)] for i in range(count)]

    def corral() -> None:
        jobs = [client.generate(model, PROMPT, options=options) for model in arrivals]
        for job in jobs:
            job.result(timeout=900)

    def naive() -> None:
        pending = deque(arrivals)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def client_thread() -> None:
            session = direct_session()
            try:
                while True:
                    with lock:
                        if not pending:
                            return
                        model = pending.popleft()
                    body: dict[str, Any] = {
                        "model": model,
                        "prompt": PROMPT,
                        "options": options,
                        "stream": True,
                    }
                    with session.post(
                        f"{sim.url}/api/generate", json=body, stream=True, timeout=900
                    ) as response:
                        response.raise_for_status()
                        for _ in response.iter_lines():
                            pass
            except BaseException as exc:  # surfaced below
                errors.append(exc)
            finally:
                session.close()

        threads = [threading.Thread(target=client_thread) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    subjects = [("corral", corral), ("naive", naive)]
    for repeat in ctx.repeats(1, 1):  # ~6 min a repeat at full size: see the README
        makespans = {}
        for name, fn in subjects if repeat % 2 == 0 else subjects[::-1]:
            makespans[name] = measure(metrics, name, fn, sim)
        metrics.add(
            "corral/naive makespan", ratio(makespans["corral"], makespans["naive"]), "x", "ratio"
        )
        ctx.log(
            f"mixed_models repeat {repeat + 1}: corral {makespans['corral']:.1f} s, "
            f"naive {makespans['naive']:.1f} s"
        )
    for c, n in zip(
        metrics.series["corral loads"].values, metrics.series["naive loads"].values, strict=True
    ):
        metrics.add("corral - naive loads", c - n, "loads", "difference")
    metrics.note(
        f"{count} requests of {options['num_predict']} tokens round-robin over "
        f"{len(MODELS)} models; MAX_LOADED_MODELS=1, load {load_s:g} s, 20 ms/token, "
        f"NUM_PARALLEL={SLOTS}; naive = {CLIENTS} direct clients in arrival order; "
        f"corral = one worker per model, --slots {SLOTS}"
    )


def measure(metrics: Metrics, name: str, fn: Callable[[], object], sim: Sim) -> float:
    sim.reset()  # nothing loaded, counters at zero
    start = time.perf_counter()
    fn()
    makespan = time.perf_counter() - start
    stats = sim.stats()
    kind = "value" if name == "corral" else "baseline"
    metrics.add(f"{name} makespan", makespan, "s", kind)
    metrics.add(f"{name} loads", stats["loads"], "loads", kind)
    metrics.add(f"{name} evictions", stats["evictions"], "evictions", kind)
    return makespan
