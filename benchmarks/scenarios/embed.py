"""Embeddings in bulk: 20,000 short inputs, each its own ``embed`` task, gathered by the worker.

The simulator keeps its catalogue timings for ``all-minilm``, an embedding model with one slot
(Ollama runs every embedding model with parallel 1): a call costs 20 ms plus 20 ms per 16
inputs, plus the simulator's own work on the vectors.

- **corral**: every input submitted as a single-input task, then every result collected; one
  worker, ``--slots`` twice ``CORRAL_EMBED_BATCH_MAX_INPUTS`` (one batch in flight while the next
  gathers). The client uses the SDK's bulk calls, ``Client.submit_many`` and ``Client.results``:
  each input is still a task of its own (own id, events and result), but tasks are admitted,
  and results read, 256 per Redis round trip. Rate: inputs / (last result - first submission).
- **direct batched**: the same inputs POSTed to ``/api/embed`` in arrays of
  ``CORRAL_EMBED_BATCH_MAX_INPUTS`` by two client threads: the best a client that batches itself
  can do.
  The CPU per input over the same window: of the worker process (with its children),
  ``redis-server``, the simulator and this client for corral; of the simulator and this client
  for direct batched.
- **one call per input**: a sample of single-input tasks on a worker with
  ``CORRAL_EMBED_BATCH_MAX_INPUTS=1`` (one task per input and one call per task: corral without
  gathering), and single-input calls straight to the simulator, its ceiling.
- **bare Celery no-op**: a sample of tasks that do nothing, on a bare Celery worker with
  corral's broker, pool, acks and events, sent and collected one at a time: about the most a
  design with one Celery message per input can deliver on this machine.

Goals: corral ≥ 0.5x direct batched, and ≥ 10x one call per input.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from celery import Celery

from benchmarks import bare_celery
from benchmarks.cpu import cpu_used
from benchmarks.registry import scenario
from benchmarks.scenarios.overhead import direct_session
from benchmarks.stack import Context, Sim
from benchmarks.stats import Metrics, ratio
from producers.client import Client
from tasks.kinds.embed import EmbedResult
from tasks.settings import Settings

MODEL = "all-minilm:latest"  # in the simulator's catalogue: 384 dimensions, one slot
BATCH = Settings.model_fields["embed_batch_max_inputs"].default
CLIENT_THREADS = 2


@scenario("embed", "20,000 single-input embed tasks gathered into shared calls", order=75)
def run(ctx: Context, metrics: Metrics) -> None:
    count = ctx.size(20_000, 400)
    sample = ctx.size(300, 30)
    texts = [f"short input number {i}" for i in range(count)]
    sim = ctx.simulator()
    # Every input is submitted before the first result is read: past the default queue bound.
    client = ctx.client(max_queue_depth=2 * count)

    with ctx.scope(keep_redis=True):  # corral without gathering: one call per task
        ctx.corral_worker([MODEL], sim, slots=4, env={"CORRAL_EMBED_BATCH_MAX_INPUTS": "1"})
        corral_tasks(client, texts[:2])  # loads the model
        unbatched = corral_tasks(client, texts[:sample])
        metrics.add("corral, one call per task", unbatched, "inputs/s", "baseline")
    single = direct(sim, texts[:sample], 1)
    metrics.add("direct, one call per input", single, "inputs/s", "baseline")
    with ctx.scope(keep_redis=True):  # the floor of one Celery message per input
        ctx.bare_worker(concurrency=4)
        bare = ctx.bare_app()
        bare_noops(bare, 50)  # warm up
        celery = bare_noops(bare, ctx.size(5_000, 200))
        metrics.add("bare Celery no-op", celery, "tasks/s", "baseline")

    worker = ctx.corral_worker([MODEL], sim, slots=2 * BATCH)
    corral_tasks(client, texts[:BATCH])  # warm up both paths
    direct(sim, texts[:BATCH], BATCH)
    subjects: dict[str, Callable[[], float]] = {
        "corral": lambda: corral_tasks(client, texts),
        "direct batched": lambda: direct(sim, texts, BATCH),
    }
    if ctx.redis_server.process is None:
        raise RuntimeError("redis-server is not running")
    pids = {"worker": worker.pid, "redis": ctx.redis_server.process.pid, "sim": sim.child.pid}
    for repeat in ctx.repeats(2, 1):
        order = ["corral", "direct batched"] if repeat % 2 == 0 else ["direct batched", "corral"]
        rates: dict[str, float] = {}
        for name in order:
            sim.reset()
            parts = pids if name == "corral" else {"sim": pids["sim"]}  # direct: no worker
            with cpu_used(parts) as used:
                rates[name] = subjects[name]()
            kind = "value" if name == "corral" else "baseline"
            for part, seconds in used.items():
                metrics.add(f"{name} CPU/input {part}", seconds / count * 1e6, "µs", kind)
            if name == "corral":
                calls = sim.stats()["requests"].get("POST /api/embed", 0)
                metrics.add("corral inputs per call", count / max(1, calls), "inputs")
            ctx.flush_results()  # results and logs of this batch; the queue is empty
        metrics.add("corral", rates["corral"], "inputs/s")
        metrics.add("direct batched", rates["direct batched"], "inputs/s", "baseline")
        corral, batched = rates["corral"], rates["direct batched"]
        metrics.add("corral/direct batched", ratio(corral, batched), "x", "ratio")
        metrics.add("corral/one call per task", ratio(corral, unbatched), "x", "ratio")
        metrics.add("corral/direct one call per input", ratio(corral, single), "x", "ratio")
        metrics.add("corral/bare Celery no-op", ratio(corral, celery), "x", "ratio")
        ctx.log(
            f"embed repeat {repeat + 1}: corral {corral:.0f}/s, direct batched {batched:.0f}/s, "
            f"one call per task {unbatched:.0f}/s"
        )
    metrics.note(
        f"{count} single-input tasks per repeat, one worker --slots {2 * BATCH}, "
        f"CORRAL_EMBED_BATCH_MAX_INPUTS={BATCH}; one call per input measured on {sample} inputs"
    )


def corral_tasks(client: Client, texts: list[str]) -> float:
    """Submit one task per text (``submit_many``: each its own task, admitted many per round
    trip), then collect every result (``results``: many read per round trip); inputs per second."""
    start = time.perf_counter()
    jobs = client.submit_many("embed", [{"model": MODEL, "input": text} for text in texts])
    for job, result in zip(jobs, client.results(jobs, timeout=600), strict=True):
        if not isinstance(result, EmbedResult) or len(result.embeddings) != 1:
            raise RuntimeError(f"task {job.id} returned {result!r}")
    return len(texts) / (time.perf_counter() - start)


def bare_noops(app: Celery, count: int) -> float:
    """Send ``count`` no-op tasks to the bare worker, then wait for every result; tasks/s."""
    start = time.perf_counter()
    results = [app.send_task(bare_celery.NOOP, queue=bare_celery.QUEUE) for _ in range(count)]
    for result in results:
        result.get(timeout=600)
    return count / (time.perf_counter() - start)


def direct(sim: Sim, texts: list[str], size: int) -> float:
    """POST the texts to ``/api/embed`` in arrays of ``size``; inputs per second."""
    batches = [texts[i : i + size] for i in range(0, len(texts), size)]
    lock = threading.Lock()

    def client_thread() -> None:
        session = direct_session()
        while True:
            with lock:
                if not batches:
                    break
                batch = batches.pop(0)
            body = {"model": MODEL, "input": batch}
            reply = session.post(f"{sim.url}/api/embed", json=body, timeout=600)
            reply.raise_for_status()
            if len(reply.json()["embeddings"]) != len(batch):
                raise RuntimeError("the simulator answered the wrong number of vectors")
        session.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client_thread) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(texts) / (time.perf_counter() - start)
