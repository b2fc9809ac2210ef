"""A chaos run: many tasks of every kind while workers are SIGKILLed, Redis restarts and the
simulator injects 503s, 500s and mid-stream crashes. Then every task is accounted for."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from producers import CapabilityError, Client
from producers.cli.local_stack import Child, start_simulator, start_worker
from tasks.events import TERMINAL_TYPES
from tasks.keys import LEDGER_STATS_KEY, log_key
from tasks.settings import load_settings
from tests.conftest import SimControl
from tests.test_contract import png
from workers.embedded_redis import EmbeddedRedis

MODELS = ("llama3.2", "llava:7b")
SUBMIT_GAP_S = 0.03  # mean pause between two submissions
WORKER_ENV = {
    "CORRAL_VISIBILITY_TIMEOUT_S": "4",
    "CORRAL_LEASE_TTL_S": "2",
    "CORRAL_TASK_ATTEMPTS": "6",
    "CORRAL_RETRY_BACKOFF_S": "0.05",
    "CORRAL_RETRY_BACKOFF_MAX_S": "0.5",
}


@dataclass
class ChaosReport:
    tasks: int = 0
    kills: int = 0
    redis_restarts: int = 0
    faults: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected_errors: list[str] = field(default_factory=list)
    missing_terminal: int = 0
    longest_recovery_s: float = 0.0
    recovered_pops: int = 0  # messages lost between pop and record, requeued by the ledger
    elapsed_s: float = 0.0

    def summary(self) -> str:
        return (
            f"chaos: {self.tasks} tasks, {self.kills} worker kills, {self.redis_restarts} "
            f"Redis restarts, {self.faults} simulator faults; lost {self.lost}, duplicated "
            f"{self.duplicated}, streams without a terminal event {self.missing_terminal}, "
            f"unexpected errors {len(self.unexpected_errors)}; longest recovery "
            f"{self.longest_recovery_s:.1f} s; lost pops recovered by the ledger "
            f"{self.recovered_pops}; {self.elapsed_s:.0f} s in all"
        )


class ChaosRun:
    def __init__(self, workdir: Path, tasks: int, kills: int, seed: int = 7) -> None:
        self.workdir = workdir
        self.task_count = tasks
        self.kill_count = kills
        self.rng = random.Random(seed)
        self.report = ChaosReport()
        self.kill_times: dict[str, float] = {}  # node → when it was killed
        self.workers: list[Child] = []
        self.generation = 0

    def run(self) -> ChaosReport:
        started = time.monotonic()
        self.redis = EmbeddedRedis(data_dir=self.workdir / "redis", appendonly=True).start()
        sim_child, sim_url = start_simulator(
            [
                "--tokens-per-second",
                "300",
                "--load-seconds",
                "0",
                "--first-token-seconds",
                "0",
                "--num-parallel",
                "4",
                "--error-rate-500",
                "0.03",
                "--error-rate-503",
                "0.03",
            ]
        )
        self.sim = SimControl(sim_url)
        try:
            for model in MODELS:
                for _ in range(2):
                    self.workers.append(self._start_worker(model))
            client = Client(settings=load_settings(redis_url=self.redis.url))
            expected_failures = set()
            jobs = []
            chaos = threading.Thread(target=self._chaos, args=(client,), daemon=True)
            chaos.start()
            for i in range(self.task_count):
                job, meant_to_fail = self._submit(client, i)
                jobs.append(job)
                if meant_to_fail:
                    expected_failures.add(job.id)
                time.sleep(self.rng.uniform(0, 2 * SUBMIT_GAP_S))
            chaos.join()
            self._account(client, jobs, expected_failures)
            client.close()
        finally:
            for child in self.workers:
                child.stop()
            sim_child.stop()
            self.redis.stop()
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _start_worker(self, model: str) -> Child:
        self.generation += 1
        name = f"{model.replace(':', '-')}-{self.generation}@chaos"
        child = start_worker(
            [model],
            redis_url=self.redis.url,
            ollama_host=self.sim.url,
            slots=2,
            name=name,
            env=WORKER_ENV,
            log_path=self.workdir / f"{self.generation}.log",
        )
        child.model = model  # type: ignore[attr-defined]
        return child

    def _submit(self, client: Client, i: int):  # noqa: ANN202
        kind = ("generate", "chat", "structured", "multimodal", "tools")[i % 5]
        options = {"num_predict": self.rng.randint(40, 120)}
        if kind == "generate":
            return client.generate(MODELS[i % 2], f"chaos {i}", options=options), False
        if kind == "chat":
            return client.chat(
                MODELS[i % 2], [{"role": "user", "content": f"chat {i}"}], options=options
            ), False
        if kind == "structured":
            schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
            return client.structured("llama3.2", schema, prompt=f"number {i}"), False
        if kind == "multimodal":
            return client.multimodal(
                "llava:7b", "what?", [png(10 + i % 7, 10)], options=options
            ), False
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        # llava has no tools capability: this one must fail with a typed, permanent error
        return client.chat("llava:7b", [{"role": "user", "content": "call f"}], tools=[tool]), True

    def _chaos(self, client: Client) -> None:
        # spread the kills over the submissions, so that they hit running tasks
        spacing = max(1.0, self.task_count * SUBMIT_GAP_S / (self.kill_count + 1))
        redis_restart_at = self.kill_count // 2
        for round_number in range(self.kill_count):
            time.sleep(spacing)
            self.sim.faults(fail_next=[{"type": "crash_after", "tokens": 5}])
            self.report.faults += 1
            if round_number == redis_restart_at:
                self.redis.kill()
                time.sleep(0.5)
                self.redis.start()
                self.report.redis_restarts += 1
            victim = self.rng.choice(self.workers)
            self.kill_times[victim.node_name] = time.time()  # type: ignore[attr-defined]
            victim.kill()
            self.report.kills += 1
            self.workers.remove(victim)
            self.workers.append(self._start_worker(victim.model))  # type: ignore[attr-defined]

    def _account(self, client: Client, jobs, expected_failures: set[str]) -> None:  # noqa: ANN001
        self.report.tasks = len(jobs)
        for job in jobs:
            try:
                job.result(timeout=180)
                if job.id in expected_failures:
                    self.report.unexpected_errors.append(f"{job.id}: succeeded, meant to fail")
            except CapabilityError:
                if job.id not in expected_failures:
                    self.report.unexpected_errors.append(f"{job.id}: CapabilityError")
            except Exception as exc:  # noqa: BLE001 - every other outcome is a finding
                if "TaskTimeout" in type(exc).__name__ and "no result" in str(exc):
                    self.report.lost += 1
                else:
                    self.report.unexpected_errors.append(f"{job.id}: {type(exc).__name__}: {exc}")
            events = [json.loads(f[b"e"]) for _, f in client.redis.xrange(log_key(job.id))]
            terminals = [e for e in events if e["type"] in TERMINAL_TYPES]
            if not terminals:
                self.report.missing_terminal += 1
            self.report.duplicated += max(0, len(terminals) - 1)
            self._recovery(events)
        self.report.recovered_pops = int(client.redis.hget(LEDGER_STATS_KEY, "requeued") or 0)
        faults = self.sim.stats().get("faults_injected", {})
        self.report.faults += sum(faults.values())

    def _recovery(self, events: list[dict]) -> None:
        starts = [e for e in events if e["type"] == "start"]
        for earlier, later in zip(starts, starts[1:], strict=False):
            killed_at = self.kill_times.get(earlier["worker"])
            if killed_at and later["at"] > killed_at:
                gap = later["at"] - killed_at
                self.report.longest_recovery_s = max(self.report.longest_recovery_s, gap)
