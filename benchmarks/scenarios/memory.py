"""Resident memory (RSS, whole process tree, psutil) of fresh processes, each repeat.

- corral worker (threads, --slots 4) idle, then its peak and final RSS under a burst of tasks;
- the bare Celery worker with the same options, measured the same way (the baseline);
- the exporter (``python -m monitoring.exporter``) idle, when that module exists;
- a bare Python interpreter, the floor every Python process pays.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks import bare_celery
from benchmarks.cpu import rss_bytes
from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context, Sim
from benchmarks.stats import Metrics, ratio
from producers.cli.local_stack import Child
from workers.embedded_redis import free_port

MIB = 2**20
PROMPT = "Describe a harbour at dawn."
OPTIONS = {"num_predict": 200, "temperature": 0}


@scenario("memory", "RSS of idle and loaded workers, and of the exporter", order=60)
def run(ctx: Context, metrics: Metrics) -> None:
    sim = ctx.simulator("--no-delay", "--num-parallel", "4")
    settle_s = ctx.size(3, 1)
    tasks = ctx.size(1000, 50)
    for repeat in ctx.repeats(3):
        with ctx.scope(keep_redis=True):
            one_repeat(ctx, metrics, sim, settle_s, tasks, bare_first=repeat % 2 == 1)
    metrics.note(
        f"threads pool, concurrency 4; idle = {settle_s} s after the worker answers a "
        f"ping; load = {tasks} tasks of {OPTIONS['num_predict']} tokens, "
        "peak sampled every 50 ms"
    )


def one_repeat(
    ctx: Context, metrics: Metrics, sim: Sim, settle_s: float, tasks: int, *, bare_first: bool
) -> None:
    """Fresh workers and a fresh reference interpreter; all stopped when the scope ends."""
    client, bare = ctx.client(), ctx.bare_app()
    python = start_reference(ctx)
    pids = {
        "corral": ctx.corral_worker([MODEL], sim, slots=4).pid,
        "bare": ctx.bare_worker(concurrency=4).pid,
    }
    time.sleep(settle_s)
    idle = {name: rss_bytes(pid) for name, pid in pids.items()}
    url = f"{sim.url}/api/generate"
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "options": OPTIONS}

    def corral_load() -> None:
        jobs = [client.generate(MODEL, PROMPT, options=OPTIONS) for _ in range(tasks)]
        for job in jobs:
            job.result(timeout=600)

    def bare_load() -> None:
        results = [
            bare.send_task(bare_celery.HTTP, args=(url, body), queue=bare_celery.QUEUE)
            for _ in range(tasks)
        ]
        for result in results:
            result.get(timeout=600)

    loads = {"corral": corral_load, "bare": bare_load}
    order = ["bare", "corral"] if bare_first else ["corral", "bare"]
    peak = {name: peak_rss(pids[name], loads[name]) for name in order}
    after = {name: rss_bytes(pid) for name, pid in pids.items()}
    floor = rss_bytes(python.pid)
    for name in ("corral", "bare"):
        kind = "value" if name == "corral" else "baseline"
        metrics.add(f"{name} worker idle", idle[name] / MIB, "MiB", kind)
        metrics.add(f"{name} worker peak under load", peak[name] / MIB, "MiB", kind)
        metrics.add(f"{name} worker after load", after[name] / MIB, "MiB", kind)
    metrics.add("bare python", floor / MIB, "MiB", "baseline")
    metrics.add("corral/bare idle", ratio(idle["corral"], idle["bare"]), "x", "ratio")
    metrics.add("corral/bare peak under load", ratio(peak["corral"], peak["bare"]), "x", "ratio")
    metrics.add("corral - bare idle", (idle["corral"] - idle["bare"]) / MIB, "MiB", "difference")
    exporter = start_exporter(ctx, metrics, settle_s)
    if exporter is not None:
        exporter_rss = rss_bytes(exporter.pid)
        metrics.add("exporter idle", exporter_rss / MIB, "MiB")
        metrics.add("exporter - bare python", (exporter_rss - floor) / MIB, "MiB", "difference")
    ctx.log(
        f"memory: corral idle {idle['corral'] / MIB:.1f} MiB, "
        f"bare idle {idle['bare'] / MIB:.1f} MiB"
    )


def peak_rss(pid: int, load: Callable[[], None]) -> int:
    """Run ``load`` while sampling the RSS of ``pid``'s tree; return the largest sample."""
    peak = [rss_bytes(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_bytes(pid))


def start_reference(ctx: Context) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True, text=True
    )
    child = Child(process)
    ctx.on_exit(child.stop)
    return child


def start_exporter(ctx: Context, metrics: Metrics, settle_s: float) -> Child | None:
    """``python -m monitoring.exporter``, if the module exists and stays up."""
    if importlib.util.find_spec("monitoring.exporter") is None:
        metrics.note("exporter skipped: monitoring.exporter does not exist yet")
        return None
    log_path = ctx.workdir / "exporter.log"
    env = ctx.child_env()
    argv = [sys.executable, "-m", "monitoring.exporter"]
    help_text = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    if "--port" in help_text:
        argv += ["--port", str(free_port())]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, text=True
        )
    child = Child(process, log_path)
    ctx.on_exit(child.stop)
    time.sleep(max(settle_s, 2))
    if not child.alive():
        metrics.note(f"exporter skipped: it exited at start: {child.log_tail(300)!r}")
        return None
    return child
