"""A batch chaos run: a JSONL batch in a file store while its submitter, its followers and
workers are SIGKILLed, Redis is killed and restarted and the simulator injects faults. Then
every line is accounted for: each ``custom_id`` once in the output and error lines, the counts
and the status agree with them, and a line ran again only after the worker running it died.

The faults fall at moments set by the batch's own progress (lines recorded, lines done), not by
the clock, so a run with the same plan does the same things in the same order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from producers import Batch, Client
from producers.batches import batch_id_of
from producers.cli.local_stack import Child, start_simulator, start_worker
from tasks.batches import describe
from tasks.events import TERMINAL_TYPES
from tasks.keys import (
    batch_key,
    batch_lines_key,
    batch_open_key,
    batch_writer_key,
    log_key,
    task_key,
)
from tasks.settings import load_settings
from tests.chaos import WORKER_ENV
from tests.conftest import SimControl
from workers.embedded_redis import EmbeddedRedis

MODELS = ("llama3.2", "llava:7b", "all-minilm")
WAIT_S = 240.0

# What each kind of line must end as: in the output, or in the errors with this code.
OUTPUT = "output"


@dataclass(frozen=True)
class Fault:
    """``action`` once ``measure`` (``recorded`` or ``done`` lines) reaches ``at`` of them."""

    measure: str
    at: float  # a fraction of the batch's lines
    action: str  # kill_submitter, kill_follower, pause_follower, kill_worker, restart_redis


SHORT_PLAN = (
    Fault("recorded", 0.25, "kill_submitter"),
    Fault("done", 0.25, "kill_worker"),
    Fault("done", 0.25, "restart_redis"),
    Fault("done", 0.55, "kill_worker"),
)
FULL_PLAN = (
    Fault("recorded", 0.1, "kill_submitter"),
    Fault("recorded", 0.4, "restart_redis"),  # while the follower resumes the submission
    Fault("done", 0.1, "kill_worker"),
    Fault("done", 0.2, "kill_follower"),
    Fault("done", 0.25, "pause_follower"),  # SIGSTOP past its writer lease, then SIGCONT
    Fault("done", 0.3, "kill_worker"),
    Fault("done", 0.4, "restart_redis"),
    Fault("done", 0.5, "kill_worker"),
    Fault("done", 0.6, "kill_follower"),
    Fault("done", 0.7, "kill_worker"),
    Fault("done", 0.8, "kill_worker"),
)


@dataclass
class BatchChaosReport:
    lines: int = 0
    actions: Counter[str] = field(default_factory=Counter)
    status: str = ""
    statuses: list[str] = field(default_factory=list)  # each status seen, in order
    counts: tuple[int, int, int] = (0, 0, 0)  # total, completed, failed
    lost: list[str] = field(default_factory=list)  # custom_ids in neither output nor errors
    doubled: list[str] = field(default_factory=list)  # custom_ids written more than once
    wrong: list[str] = field(default_factory=list)  # lines that ended other than they should
    file_lines: int = 0  # lines in the output file on disk
    ran_again: int = 0  # lines started twice because the worker running them died
    ran_twice: list[str] = field(default_factory=list)  # started twice with no such reason
    bad_streams: list[str] = field(default_factory=list)  # not exactly one terminal event
    follower_exits: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    def summary(self) -> str:
        actions = ", ".join(f"{n} {a}" for a, n in sorted(self.actions.items()))
        return (
            f"batch chaos: {self.lines} lines, {actions}; ended {self.status} with "
            f"total/completed/failed {self.counts}; lost {len(self.lost)}, doubled "
            f"{len(self.doubled)}, wrong outcome {len(self.wrong)}, run twice without a "
            f"dead worker {len(self.ran_twice)}, streams without one end "
            f"{len(self.bad_streams)}; {self.ran_again} lines ran again after a kill; "
            f"statuses {' > '.join(self.statuses)}; followers exited {self.follower_exits}; "
            f"{self.elapsed_s:.0f} s in all"
        )


def make_lines(count: int) -> tuple[list[str], dict[str | None, str]]:
    """The input (JSON text lines) and what each custom_id must end as (``output`` or the error
    code): chat, completions and embeddings that succeed, tool calls on a model without tools
    that fail, and lines refused as they are read."""
    lines: list[str] = []
    expected: dict[str | None, str] = {}
    for i in range(count):
        custom_id = f"line-{i}"
        tokens = 20 + i % 30
        if i % 10 == 3:
            url, body = "/v1/completions", {"model": "llama3.2", "prompt": f"Go {i}"}
            body["max_tokens"] = tokens
        elif i % 10 == 5:
            url, body = "/v1/embeddings", {"model": "all-minilm", "input": f"text {i}"}
        elif i % 10 == 7:  # llava has no tools capability: a typed, permanent failure
            tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
            url = "/v1/chat/completions"
            body = {"model": "llava:7b", "messages": [{"role": "user", "content": "f"}]}
            body["tools"] = [tool]
        else:
            url = "/v1/chat/completions"
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": f"Line {i}"}]}
            body["max_tokens"] = tokens
        lines.append(
            json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
        )
        expected[custom_id] = "capability_error" if i % 10 == 7 else OUTPUT
    refused = {"url": "/v1/nowhere", "method": "POST", "body": {}, "custom_id": "bad-url"}
    lines[len(lines) // 3 : len(lines) // 3] = ["{broken", json.dumps(refused)]
    expected[None] = "invalid_request"
    expected["bad-url"] = "invalid_request"
    return lines, expected


class BatchChaosRun:
    def __init__(
        self, workdir: Path, lines: int, plan: tuple[Fault, ...], workers: int, replace: bool
    ) -> None:
        """``workers`` start at once; with ``replace``, each killed one is replaced (started in
        the background: a worker takes seconds to start on a loaded machine)."""
        self.workdir = workdir
        self.line_count = lines
        self.plan = plan
        self.worker_count = workers
        self.replace = replace
        self.report = BatchChaosReport()
        self.workers: list[Child] = []
        self.starting: list[Future[Child]] = []
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.killed: set[str] = set()  # node names of the workers SIGKILLed
        self.generation = 0
        self.follower: subprocess.Popen[bytes] | None = None
        self.submitter: subprocess.Popen[bytes] | None = None
        self.resumed: list[subprocess.Popen[bytes]] = []
        self.errors: list[BaseException] = []

    def run(self) -> BatchChaosReport:
        started = time.monotonic()
        self.redis = EmbeddedRedis(data_dir=self.workdir / "redis", appendonly=True).start()
        sim_child, sim_url = start_simulator(
            ["--tokens-per-second", "100", "--load-seconds", "0", "--first-token-seconds", "0",
             "--num-parallel", "4", "--error-rate-500", "0.03", "--error-rate-503", "0.03"]
        )  # fmt: skip
        self.sim = SimControl(sim_url)
        self.settings = load_settings(redis_url=self.redis.url).model_copy(
            update={"batch_dir": self.workdir / "batches", "batch_redis_max_lines": 10}
        )
        lines, expected = make_lines(self.line_count)
        self.path = self.workdir / "in.jsonl"
        self.path.write_text("\n".join(lines) + "\n")
        self.report.lines = len(lines)
        self.batch_id = batch_id_of("default", "", describe(self.path).file_id)
        self.watch = redis.Redis.from_url(self.redis.url, socket_timeout=2)
        try:
            self.starting = [self.pool.submit(self._start_worker) for _ in range(self.worker_count)]
            self._ready(self.worker_count)
            self.submitter = self._cli("submit", str(self.path))
            self._play(len(lines))
            with Client(settings=self.settings) as client:  # a fresh process's view
                info = Batch(client, self.batch_id).wait(timeout=WAIT_S)
                for process in self.resumed:  # a follower stopped mid-write ends as usual
                    self.report.follower_exits.append(process.wait(timeout=WAIT_S))
                self._account(client, info, expected)
        finally:
            for process in (self.submitter, self.follower, *self.resumed):
                if process is not None and process.poll() is None:
                    process.kill()
                    process.wait()
            self.pool.shutdown(wait=True)
            for child in [*self.workers, *(f.result() for f in self.starting if not f.exception())]:
                child.stop()
            self.watch.close()
            sim_child.stop()
            self.redis.stop()
        self.report.elapsed_s = time.monotonic() - started
        return self.report

    def _start_worker(self) -> Child:
        self.generation += 1
        return start_worker(
            MODELS,
            redis_url=self.redis.url,
            ollama_host=self.sim.url,
            slots=2,
            name=f"batch-{self.generation}@chaos",
            env=WORKER_ENV,
            log_path=self.workdir / f"worker-{self.generation}.log",
        )

    def _cli(self, *args: str) -> subprocess.Popen[bytes]:
        env = {
            "CORRAL_REDIS_URL": self.redis.url,
            "CORRAL_BATCH_DIR": str(self.settings.batch_dir),
            "CORRAL_BATCH_REDIS_MAX_LINES": str(self.settings.batch_redis_max_lines),
        }
        with open(self.workdir / f"cli-{time.monotonic_ns()}.log", "wb") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "producers.cli", "batch", *args],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _progress(self) -> dict[str, int] | None:
        """Lines recorded and done so far; None while Redis is away."""
        try:
            pipe = self.watch.pipeline()
            pipe.hlen(batch_lines_key(self.batch_id))
            pipe.hmget(batch_key(self.batch_id), ["completed", "failed", "status"])
            recorded, (completed, failed, status) = pipe.execute()
        except redis.RedisError:
            return None
        if status and (not self.report.statuses or self.report.statuses[-1] != status.decode()):
            self.report.statuses.append(status.decode())
        ended = status in (b"completed", b"failed", b"cancelled", b"expired")
        return {
            "recorded": int(recorded),
            "done": int(completed or 0) + int(failed or 0),
            "ended": int(ended),
        }

    def _play(self, lines: int) -> None:
        """Carry out the plan in order as the batch gets there, then watch it to its end (each
        status it shows is recorded); keep a follower alive all along."""
        deadline = time.monotonic() + WAIT_S
        plan = list(self.plan)
        while True:
            step = plan[0] if plan else "the end"
            assert time.monotonic() < deadline, f"the batch got stuck before {step}"
            self._keep_following()
            progress = self._progress()
            if progress is None:
                time.sleep(0.05)
            elif not plan:
                if progress["ended"]:
                    return
                time.sleep(0.05)
            elif progress["ended"]:
                raise AssertionError(f"the batch ended before {step}")
            elif progress[plan[0].measure] >= plan[0].at * lines:
                getattr(self, plan[0].action)()
                self.report.actions[plan[0].action] += 1
                plan.pop(0)
            else:
                time.sleep(0.02)

    def _keep_following(self) -> None:
        """Once the first submitter is gone, a CLI follower resumes the submission and follows
        the batch to its end (``submit --wait``); one that exits early is started again."""
        if self.submitter is not None and self.submitter.poll() is None:
            return
        if self.follower is not None and self.follower.poll() is None:
            return
        if self.follower is not None:
            self.report.follower_exits.append(self.follower.returncode)
        self.follower = self._cli("submit", str(self.path), "--wait")

    def kill_submitter(self) -> None:
        assert self.submitter is not None
        assert self.submitter.poll() is None, "the submission finished before its kill"
        self.submitter.kill()
        self.submitter.wait()

    def kill_follower(self) -> None:
        if self.follower is not None and self.follower.poll() is None:
            self.follower.kill()
            self.follower.wait()
            self.follower = None

    def pause_follower(self) -> None:
        """Stop the follower (as Ctrl-Z does) until another one holds the writer lease, then
        let it carry on beside that one: if it was mid-write, it finishes with a lapsed lease."""
        assert self.follower is not None and self.follower.poll() is None
        paused, self.follower = self.follower, None
        lease = self._lease()
        paused.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + WAIT_S
        try:
            while self._lease() in (None, lease):
                assert time.monotonic() < deadline, "no follower took the writer lease over"
                self._keep_following()  # a new follower, the one to take over
                time.sleep(0.05)
        finally:
            paused.send_signal(signal.SIGCONT)
        self.resumed.append(paused)

    def _lease(self) -> bytes | None:
        """Who holds the batch's writer lease (None while Redis is away, too)."""
        try:
            return self.watch.get(batch_writer_key(self.batch_id))  # type: ignore[return-value]
        except redis.RedisError:
            return None

    def kill_worker(self) -> None:
        self._ready(2)  # one is left to take the victim's tasks
        victim = self._busiest()
        self.workers.remove(victim)
        self.killed.add(victim.node_name)  # type: ignore[attr-defined]
        victim.kill()
        if self.replace:
            self.starting.append(self.pool.submit(self._start_worker))

    def _busiest(self) -> Child:
        """The worker running most of the batch's lines now (their records name it)."""
        try:
            open_ids = self.watch.hkeys(batch_open_key(self.batch_id))
            pipe = self.watch.pipeline(transaction=False)
            for task_id in open_ids:
                pipe.hmget(task_key(task_id.decode()), ["state", "worker"])
            records = pipe.execute()
        except redis.RedisError:
            records = []  # Redis is restarting: the oldest worker, then
        running = Counter(w.decode() for s, w in records if s == b"running" and w)
        return max(self.workers, key=lambda w: running[w.node_name])  # type: ignore[attr-defined]

    def _ready(self, count: int) -> None:
        """Move started workers to the running list, waiting until ``count`` run."""
        while self.starting and (len(self.workers) < count or self.starting[0].done()):
            self.workers.append(self.starting.pop(0).result(timeout=WAIT_S))
        assert len(self.workers) >= count, "no worker left to kill"

    def restart_redis(self) -> None:
        self.redis.kill()
        self.redis.start()

    def _account(self, client: Client, info: Any, expected: dict[str | None, str]) -> None:
        report = self.report
        report.status = info.status
        if report.statuses[-1] != info.status:
            report.statuses.append(info.status)
        report.counts = (info.total, info.completed, info.failed)
        batch = Batch(client, self.batch_id)
        output = list(batch.results())
        errors = list(batch.errors())
        written = Counter(x["custom_id"] for x in [*output, *errors])
        report.lost = [str(c) for c in expected if c not in written]
        report.doubled = [str(c) for c, n in written.items() if n > 1]
        for line in output:
            if expected.get(line["custom_id"]) != OUTPUT or line["response"]["status_code"] != 200:
                report.wrong.append(f"{line['custom_id']}: {line}")
        for line in errors:
            code = (line["error"] or {}).get("code") or _response_code(line)
            if expected.get(line["custom_id"]) != code:
                report.wrong.append(f"{line['custom_id']}: {code}, {line}")
        out_file = self.settings.batch_dir / self.batch_id / "output.jsonl"
        report.file_lines = len(out_file.read_text().splitlines()) if out_file.exists() else 0
        for line in output:
            task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{self.batch_id}/{line['custom_id']}"))
            if line["response"]["request_id"] != task_id:
                report.wrong.append(f"{line['custom_id']}: request_id is not its line's task")
        for custom_id, task_id in client.redis.hgetall(batch_lines_key(self.batch_id)).items():
            self._check_stream(client, custom_id.decode(), task_id.decode())

    def _check_stream(self, client: Client, custom_id: str, task_id: str) -> None:
        events = [json.loads(f[b"e"]) for _, f in client.redis.xrange(log_key(task_id))]
        if sum(e["type"] in TERMINAL_TYPES for e in events) != 1:
            self.report.bad_streams.append(custom_id)
        starts = [e for e in events if e["type"] == "start"]
        if len(starts) > 1:
            self.report.ran_again += 1
            if any(s["worker"] not in self.killed for s in starts[:-1]):
                self.report.ran_twice.append(
                    f"{custom_id}: started on {[s['worker'] for s in starts]}"
                )


def _response_code(line: dict[str, Any]) -> str | None:
    """The error code of a line that ran and failed (OpenAI's error body)."""
    body = (line.get("response") or {}).get("body") or {}
    error: dict[str, Any] = body.get("error") or {}
    return error.get("code") or error.get("type")
