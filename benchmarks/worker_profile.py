"""Where one worker process's time goes under load: ``python -m benchmarks.worker_profile``.

Starts the standard stack of ``throughput`` (a zero-delay simulator, one ``corral worker`` and
one bare Celery worker, ``--slots 4``), keeps ``--in-flight`` tasks of one subject (``corral`` or
``bare``) submitted and collected in rounds, and over ``--seconds`` of that load reports, per
task finished: the worker's user and system CPU, its threads' context switches (voluntary and
not, from ``/proc``; a hand-over between threads costs two), redis-server's CPU, and Redis's
commands by name with the time Redis spent in them (those run inside scripts included, and also
counted in their script's time). With ``--py-spy FILE`` (py-spy installed), it also samples the
worker's thread holding the GIL into FILE (collapsed stacks) and prints the functions most often
on those stacks. Counts, unlike rates, barely move with the machine's load: they show what a
change cut.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks import bare_celery
from benchmarks.stack import MODEL, Context, Standard
from workers.embedded_redis import EmbeddedRedis

PROMPT = "Name a colour."
OPTIONS: dict[str, Any] = {"num_predict": 16, "temperature": 0}


class Load(threading.Thread):
    """Submits ``in_flight`` tasks, collects every result, again, until stopped."""

    def __init__(self, stack: Standard, subject: str, in_flight: int) -> None:
        super().__init__(daemon=True, name="worker-profile-load")
        self.stack, self.subject, self.in_flight = stack, subject, in_flight
        self.finished = 0
        self.halt = threading.Event()

    def run(self) -> None:
        stack, url = self.stack, f"{self.stack.sim.url}/api/generate"
        body = {"model": MODEL, "prompt": PROMPT, "options": OPTIONS}
        while not self.halt.is_set():
            if self.subject == "corral":
                jobs = [
                    stack.client.generate(MODEL, PROMPT, options=OPTIONS)
                    for _ in range(self.in_flight)
                ]
                for job in jobs:
                    job.result(timeout=600)
                    self.finished += 1
            else:
                sent = [
                    stack.bare.send_task(
                        bare_celery.HTTP, args=(url, body), queue=bare_celery.QUEUE
                    )
                    for _ in range(self.in_flight)
                ]
                for result in sent:
                    result.get(timeout=600)
                    self.finished += 1


def switches(pid: int) -> dict[str, tuple[int, int]]:
    """Per thread (``name:tid``): voluntary and involuntary context switches so far."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(
            line.split(":\t", 1)
            for line in (task / "status").read_text().splitlines()
            if ":\t" in line
        )
        name = f"{fields['Name'].strip()}:{task.name}"
        out[name] = (
            int(fields["voluntary_ctxt_switches"]),
            int(fields["nonvoluntary_ctxt_switches"]),
        )
    return out


def commands(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Per command name: calls and microseconds of Redis CPU so far (a script's include its own)."""
    return {
        name.removeprefix("cmdstat_"): (int(stats["calls"]), int(stats["usec"]))
        for name, stats in client.info("commandstats").items()
    }


def top_functions(collapsed: Path, count: int) -> list[tuple[float, str]]:
    """The functions on most of py-spy's sampled stacks (share of samples, function)."""
    seen: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        total += int(samples)
        for frame in {f.split(" (")[0] for f in stack.split(";")}:
            seen[frame] += int(samples)
    return [(n / total, frame) for frame, n in seen.most_common(count)] if total else []


def profile(ctx: Context, args: argparse.Namespace) -> None:
    stack = ctx.standard_stack()
    launcher = stack.worker.pid if args.subject == "corral" else stack.bare_worker.pid
    children = psutil.Process(launcher).children(recursive=True)
    pid = (
        children[0].pid if args.subject == "corral" and children else launcher
    )  # not the supervisor
    load = Load(stack, args.subject, args.in_flight)
    load.start()
    client = redis.Redis.from_url(ctx.redis_url)
    server = psutil.Process(int(client.info("server")["process_id"]))
    time.sleep(args.warm_up)
    worker = psutil.Process(pid)
    server0 = sum(server.cpu_times()[:2])
    cpu0, switches0, commands0, done0 = (
        worker.cpu_times(),
        switches(pid),
        commands(client),
        load.finished,
    )
    started = time.monotonic()
    if args.py_spy:
        spy = [shutil.which("py-spy") or "py-spy", "record", "--gil", "-p", str(pid), "-r", "200"]
        spy += ["-d", str(args.seconds), "-f", "raw", "-o", str(args.py_spy)]
        subprocess.run(spy, check=True, capture_output=True)
    else:
        time.sleep(args.seconds)
    server1 = sum(server.cpu_times()[:2])
    cpu1, switches1, commands1, done = (
        worker.cpu_times(),
        switches(pid),
        commands(client),
        load.finished - done0,
    )
    elapsed = time.monotonic() - started
    load.halt.set()
    load.join()
    client.close()
    if done == 0:
        raise SystemExit("no task finished in the window: give it more --seconds")
    per = 1e6 / done
    print(f"{args.subject}: {done} tasks in {elapsed:.1f} s ({done / elapsed:.0f}/s)")
    print(
        f"worker CPU per task: user {per * (cpu1.user - cpu0.user):.0f} µs, "
        f"system {per * (cpu1.system - cpu0.system):.0f} µs"
    )
    print(f"redis-server CPU per task: {per * (server1 - server0):.0f} µs")
    print("context switches per task, by thread (voluntary + involuntary):")
    rows: list[tuple[float, float, str]] = []
    for name, (voluntary, involuntary) in switches1.items():
        before = switches0.get(name, (0, 0))
        rows.append(((voluntary - before[0]) / done, (involuntary - before[1]) / done, name))
    rows.sort(reverse=True)
    for vol, invol, name in rows:
        if vol + invol >= 0.05:
            print(f"  {name:28} {vol:6.2f} + {invol:5.2f}")
    print(f"  {'all threads':28} {sum(r[0] for r in rows):6.2f} + {sum(r[1] for r in rows):5.2f}")
    calls, usec = {}, {}
    for n, (count, spent) in commands1.items():
        count0, spent0 = commands0.get(n, (0, 0))
        calls[n], usec[n] = (count - count0) / done, (spent - spent0) / done
    busy = sorted(((n, c) for n, c in calls.items() if c >= 0.05), key=lambda nc: -nc[1])
    print(f"Redis commands per task: {sum(calls.values()):.1f}")
    print("  " + ", ".join(f"{name} {count:.2f}" for name, count in busy))
    costly = sorted(((n, u) for n, u in usec.items() if u >= 0.5), key=lambda nu: -nu[1])
    print("Redis time per task in commands, µs (a script's own commands counted in it, too):")
    print("  " + ", ".join(f"{name} {u:.1f}" for name, u in costly))
    if args.py_spy:
        print("functions on the GIL holder's stack (share of samples):")
        for share, frame in top_functions(args.py_spy, args.top):
            print(f"  {100 * share:5.1f}% {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_profile")
    parser.add_argument("subject", choices=["corral", "bare"])
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warm-up", type=float, default=3.0, help="load before the window")
    parser.add_argument("--in-flight", type=int, default=3000, help="tasks per round")
    parser.add_argument("--py-spy", type=Path, help="also sample the worker with py-spy into this")
    parser.add_argument("--top", type=int, default=40, help="functions listed from py-spy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-profile-") as tmp, EmbeddedRedis() as server:
        ctx = Context(server, Path(tmp), quick=False, repeats=None, log=lambda _: None)
        with ctx.scope():
            profile(ctx, args)


if __name__ == "__main__":
    main()
