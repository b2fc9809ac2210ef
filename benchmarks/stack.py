"""Set-up for a benchmark run: one real Redis for the whole run, and per scenario the simulator,
corral workers, bare Celery workers and clients, every one stopped when the scenario ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
from celery import Celery

from benchmarks import bare_celery
from producers.cli.local_stack import Child, start_simulator, start_worker
from producers.client import Client
from tasks.keys import (
    SCHED_OFFERED_KEY,
    SCHED_SERVED_KEY,
    WORKERS_KEY,
    canonical_model,
    worker_key,
)
from tasks.scheduler.served import served_models
from tasks.settings import load_settings
from workers.embedded_redis import EmbeddedRedis

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "llama3.2:latest"  # in the simulator's default catalogue


@dataclass
class Sim:
    """A running simulator and its admin API."""

    url: str
    child: Child

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_sim/stats", timeout=10).json()

    def reset(self) -> None:
        requests.post(f"{self.url}/_sim/reset", timeout=10).raise_for_status()


@dataclass
class Standard:
    """The stack most scenarios share: a zero-delay simulator, one corral worker and one bare
    Celery worker with the same pool and concurrency, and a client for each."""

    sim: Sim
    worker: Child
    bare_worker: Child
    client: Client
    bare: Celery
    slots: int


class Context:
    """What a scenario gets: sizes (full or quick), repeats, and process starters."""

    def __init__(
        self,
        redis_server: EmbeddedRedis,
        workdir: Path,
        *,
        quick: bool,
        repeats: int | None,
        log: Callable[[str], None],
        minutes: float | None = None,
    ) -> None:
        self.redis_server = redis_server
        self.redis_url = redis_server.url
        self.workdir = workdir
        self.quick = quick
        self._repeats = repeats
        self.minutes = minutes  # --minutes: how long a timed scenario runs
        self.log = log
        self._procs: ExitStack | None = None
        self._standard: Standard | None = None
        self._names = 0

    # -- sizes ------------------------------------------------------------------------------
    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def repeats(self, full: int, quick: int = 2) -> range:
        """Repeat indices; ``--repeats`` overrides the scenario's own count."""
        return range(self._repeats or (quick if self.quick else full))

    # -- scope ------------------------------------------------------------------------------
    @contextmanager
    def scope(self, *, keep_redis: bool = False) -> Iterator[None]:
        """Everything started inside is stopped on the way out, in reverse order.

        Scopes nest: an inner scope stops its own processes and leaves the outer ones running.
        """
        outer, outer_standard = self._procs, self._standard
        with ExitStack() as procs:
            self._procs = procs
            self._standard = None
            if not keep_redis:
                self.redis().flushall()
            try:
                yield
            finally:
                self._procs, self._standard = outer, outer_standard

    def on_exit(self, callback: Callable[[], Any]) -> None:
        """Run ``callback`` (stop a process, close a client) when the current scope ends."""
        if self._procs is None:
            raise RuntimeError("start processes inside Context.scope()")
        self._procs.callback(callback)

    def child_env(self) -> dict[str, str]:
        """The environment for a child process that talks to this run's Redis."""
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        return {
            **os.environ,
            "CORRAL_REDIS_URL": self.redis_url,
            "BENCH_REDIS_URL": self.redis_url,
            "PYTHONPATH": path,
        }

    def _name(self, label: str) -> str:
        self._names += 1
        return f"{label}-{self._names}.{os.getpid()}@localhost"

    # -- processes --------------------------------------------------------------------------
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def flush_results(self) -> None:
        """Empty Redis of a batch's results and logs, keeping the workers' announcements (what
        they serve): admission would refuse the next batch until they announce again."""
        client = self.redis()
        try:
            keep = [
                SCHED_SERVED_KEY,
                SCHED_OFFERED_KEY,
                WORKERS_KEY,
                *client.scan_iter(match=worker_key("*")),
            ]
            dumps = [(key, client.dump(key), client.pttl(key)) for key in keep]
            client.flushdb()
            for key, value, ttl_ms in dumps:
                if value is not None:
                    client.restore(key, max(0, ttl_ms), value, replace=True)
        finally:
            client.close()

    def simulator(self, *args: str, config: dict[str, Any] | None = None) -> Sim:
        argv = list(args)
        if config is not None:
            path = self.workdir / f"sim-{self._names + 1}.json"
            self._names += 1
            path.write_text(json.dumps(config))
            argv += ["--config", str(path)]
        child, url = start_simulator(argv)
        self.on_exit(child.stop)
        return Sim(url, child)

    def corral_worker(
        self, models: Sequence[str], sim: Sim, *, slots: int, env: dict[str, str] | None = None
    ) -> Child:
        """``corral worker`` for ``models``; ``env`` adds settings (``CORRAL_*``) of its own."""
        name = self._name("corral")
        child = start_worker(
            models,
            redis_url=self.redis_url,
            ollama_host=sim.url,
            slots=slots,
            name=name,
            log_path=self.workdir / f"{name.split('@')[0]}.log",
            env=env,
        )
        self.on_exit(child.stop)
        self.wait_served(models)
        return child

    def wait_served(self, models: Sequence[str], timeout_s: float = 30.0) -> None:
        """Wait until admission sees ``models`` served: a worker announces them once its
        consumer is up, which can come after it answers a ping (and a flush forgets them)."""
        wanted = {canonical_model(m) for m in models}
        deadline = time.monotonic() + timeout_s
        client, settings = self.redis(), load_settings()
        try:
            while not wanted <= set(served_models(client, settings)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no worker announced {sorted(wanted)} in {timeout_s:g} s")
                time.sleep(0.05)
        finally:
            client.close()

    def bare_worker(self, *, concurrency: int) -> Child:
        """``celery -A benchmarks.bare_celery worker`` with corral's worker options."""
        node = self._name("bare")
        log_path = self.workdir / f"{node.split('@')[0]}.log"
        # Flags beside their values; the formatter would put each word on a line of its own.
        argv = [sys.executable, "-m", "celery", "-A", "benchmarks.bare_celery", "worker",
                "--queues", bare_celery.QUEUE, "--pool", "threads",
                "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
                "--without-mingle", "--without-gossip", "--task-events",
                "--loglevel", "WARNING", "--hostname", node]  # fmt: skip
        env = {**self.child_env(), "BENCH_HTTP_POOL": str(concurrency)}
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                argv,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
                text=True,
            )
        child = Child(process, log_path)
        self.on_exit(child.stop)
        app = self.bare_app()
        deadline = time.monotonic() + 30
        while not app.control.ping(destination=[node], timeout=0.5):
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"bare Celery worker {node} did not start:\n{child.log_tail()}")
        return child

    def client(self, **settings: object) -> Client:
        """A client on the run's Redis; ``settings`` override the environment's."""
        client = Client(settings=load_settings(redis_url=self.redis_url, **settings))
        self.on_exit(client.close)
        return client

    def bare_app(self) -> Celery:
        app = bare_celery.make_app(self.redis_url)
        self.on_exit(app.close)
        return app

    def standard_stack(self, slots: int = 4) -> Standard:
        """Started once per scenario, on first use."""
        if self._standard is None:
            sim = self.simulator("--no-delay", "--num-parallel", str(slots))
            worker = self.corral_worker([MODEL], sim, slots=slots)
            bare = self.bare_worker(concurrency=slots)
            self._standard = Standard(sim, worker, bare, self.client(), self.bare_app(), slots)
        return self._standard
