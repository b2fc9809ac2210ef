"""The exporter's metrics: counters and histograms fed by task events, gauges read on scrape.

Naming follows Prometheus conventions: the ``corral_`` prefix, base units (seconds, bytes),
``_total`` on counters. Labels stay bounded: ``model`` and ``kind`` come from the configured
models and the four task kinds, ``error`` from the typed error tree, ``priority`` from the ten
priority bands, ``tenant`` from the few tenants with the most waiting tasks plus ``other``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from monitoring.ollama_ps import HostState
from monitoring.snapshot import Snapshot
from tasks.keys import model_of_queue
from tasks.scheduler import MAX_PRIORITY
from tasks.scheduler.lua import WAIT_BUCKETS_S

# An LLM task takes from a fraction of a second to many minutes, queueing included.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
SPEED_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000)
TOP_TENANTS = 10  # tenants shown by name per model; the rest add up under "other"
OTHER_TENANTS = "other"
TASK_STATES = (
    "sent",
    "received",
    "started",
    "succeeded",
    "failed",
    "cancelled",
    "retried",
    "revoked",
)


@dataclass(frozen=True)
class TaskMetrics:
    """What task events and results add up to (registered in one registry)."""

    tasks: Counter
    queue_wait: Histogram
    first_token: Histogram
    duration: Histogram
    tokens: Counter
    prompt_tokens: Counter
    generation_seconds: Counter
    tokens_per_second: Histogram
    errors: Counter
    retries: Counter
    cancellations: Counter
    dead_letters: Counter
    events: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> TaskMetrics:
        km = ("kind", "model")
        return cls(
            tasks=Counter(
                "corral_tasks",
                "Task state transitions seen in Celery task events.",
                [*km, "state"],
                registry=registry,
            ),
            queue_wait=Histogram(
                "corral_task_queue_wait_seconds",
                "From submission to the start of the run (succeeded tasks).",
                km,
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            first_token=Histogram(
                "corral_task_time_to_first_token_seconds",
                "From submission to the first token (succeeded tasks).",
                km,
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            duration=Histogram(
                "corral_task_duration_seconds",
                "From submission to the result (succeeded tasks).",
                km,
                buckets=LATENCY_BUCKETS_S,
                registry=registry,
            ),
            tokens=Counter(
                "corral_tokens_generated",
                "Tokens generated (Ollama eval_count).",
                ["model"],
                registry=registry,
            ),
            prompt_tokens=Counter(
                "corral_prompt_tokens",
                "Prompt tokens evaluated (Ollama prompt_eval_count).",
                ["model"],
                registry=registry,
            ),
            generation_seconds=Counter(
                "corral_generation_seconds",
                "Time Ollama spent generating (eval_duration); "
                "tokens/s = rate(tokens) / rate(this).",
                ["model"],
                registry=registry,
            ),
            tokens_per_second=Histogram(
                "corral_generation_tokens_per_second",
                "Generation speed of each succeeded task.",
                ["model"],
                buckets=SPEED_BUCKETS,
                registry=registry,
            ),
            errors=Counter(
                "corral_task_errors",
                "Failed tasks by typed error class.",
                [*km, "error", "retryable"],
                registry=registry,
            ),
            retries=Counter(
                "corral_task_retries",
                "Extra attempts after retryable failures.",
                km,
                registry=registry,
            ),
            cancellations=Counter(
                "corral_task_cancellations",
                "Tasks cancelled by a caller (TaskCancelled or a Celery revoke).",
                km,
                registry=registry,
            ),
            dead_letters=Counter(
                "corral_dead_letters",
                "Tasks moved to the dead-letter queue "
                "(retryable failures that ran out of attempts).",
                km,
                registry=registry,
            ),
            events=Counter(
                "corral_exporter_events",
                "Celery events the exporter received.",
                ["type"],
                registry=registry,
            ),
        )


class StateCollector(Collector):
    """Gauges computed on scrape from the cached Redis snapshot and the /api/ps poller."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        hosts: Callable[[], list[HostState]],
        receiver_up: Callable[[], bool] = lambda: True,
        top_tenants: int = TOP_TENANTS,
    ) -> None:
        self._snapshot = snapshot
        self._hosts = hosts
        self._receiver_up = receiver_up
        self.top_tenants = top_tenants

    def describe(self) -> Iterator[Metric]:
        return iter(())  # keeps registration from triggering a Redis read

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._queues(snap)
        yield from self._scheduler(snap)
        yield from self._workers(snap)
        yield from self._ollama(self._hosts())
        yield from self._self(snap)

    @staticmethod
    def _queues(snap: Snapshot) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "corral_queue_messages",
            "Tasks waiting for a model: messages in its Celery queue "
            "plus the tasks the scheduler holds until a slot frees.",
            labels=["model", "queue"],
        )
        age = GaugeMetricFamily(
            "corral_queue_oldest_message_age_seconds",
            "How long the oldest task waiting for a model has waited (0 when none waits).",
            labels=["model", "queue"],
        )
        for q in snap.queues:
            depth.add_metric([q.model, q.queue], q.waiting)
            age.add_metric([q.model, q.queue], round(q.oldest_age_s, 3))
        yield depth
        yield age
        yield GaugeMetricFamily(
            "corral_unacked_messages",
            "Messages delivered to a worker and not yet acknowledged (reserved or running).",
            value=snap.unacked,
        )
        yield GaugeMetricFamily(
            "corral_dead_letter_queue_messages",
            "Dead letters waiting for `corral dlq retry`.",
            value=snap.dead_letters,
        )
        yield CounterMetricFamily(
            "corral_messages_recovered",
            "Messages lost between a worker's pop and its record, and "
            "queued again by the ledger sweep.",
            value=snap.recovered,
        )

    def _scheduler(self, snap: Snapshot) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "corral_scheduler_pending_tasks",
            "Tasks the scheduler holds for a model, by priority band (priority plus the steps "
            "gained by waiting).",
            labels=["model", "priority"],
        )
        released = GaugeMetricFamily(
            "corral_scheduler_released_tasks",
            "Tasks released to a model's Celery queue and not started yet.",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "corral_scheduler_running_tasks", "Tasks of a model running now.", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "corral_scheduler_oldest_wait_seconds",
            "How long a model's oldest pending task has waited (0 when none is pending).",
            labels=["model"],
        )
        service = GaugeMetricFamily(
            "corral_scheduler_service_seconds",
            "A model's mean run time, as its ETAs use it.",
            labels=["model"],
        )
        tenants = GaugeMetricFamily(
            "corral_scheduler_tenant_pending_tasks",
            f"Pending tasks of the {self.top_tenants} tenants with the most per model; the "
            f'others add up under tenant="{OTHER_TENANTS}".',
            labels=["model", "tenant"],
        )
        for b in snap.backlogs:
            for band in range(MAX_PRIORITY + 1):
                pending.add_metric([b.model, str(band)], b.by_band.get(band, 0))
            released.add_metric([b.model], b.released)
            running.add_metric([b.model], b.running)
            oldest.add_metric([b.model], round(b.oldest_wait_s, 3))
            if b.service_s is not None:
                service.add_metric([b.model], b.service_s)
            for tenant, count in top_tenants(b.by_tenant, self.top_tenants):
                tenants.add_metric([b.model, tenant], count)
        yield from (pending, released, running, oldest, service, tenants)

        waits = HistogramMetricFamily(
            "corral_scheduler_wait_seconds",
            "From submission to start of the tasks released in each priority band.",
            labels=["priority"],
        )
        for band, hist in snap.waits.items():
            cumulative, buckets = 0, []
            for bound, count in zip([*WAIT_BUCKETS_S, float("inf")], hist.counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), cumulative))
            waits.add_metric([str(band)], buckets, sum_value=hist.sum_s)
        yield waits

        switches = CounterMetricFamily(
            "corral_scheduler_model_switches",
            "Models an Ollama host was switched to by the scheduler (each a model load).",
            labels=["host"],
        )
        serving = GaugeMetricFamily(
            "corral_scheduler_host_model",
            "1 for the model the scheduler keeps each Ollama host on.",
            labels=["host", "model"],
        )
        for host in snap.scheduled_hosts:
            switches.add_metric([host.host], host.switches)
            if host.model:
                serving.add_metric([host.host, host.model], 1)
        yield switches
        yield serving

    @staticmethod
    def _workers(snap: Snapshot) -> Iterator[Metric]:
        count = GaugeMetricFamily(
            "corral_workers", "Live workers consuming a model's queue.", labels=["model"]
        )
        slots = GaugeMetricFamily(
            "corral_worker_slots",
            "Concurrent task slots of a live worker for a model.",
            labels=["model", "node", "ollama_host"],
        )
        per_model: dict[str, int] = {}
        for worker in snap.workers:
            for queue in worker.queues:
                model = model_of_queue(queue)
                per_model[model] = per_model.get(model, 0) + 1
                slots.add_metric([model, worker.node, worker.ollama_host], worker.slots)
        for model, n in sorted(per_model.items()):
            count.add_metric([model], n)
        yield count
        yield slots

    @staticmethod
    def _ollama(hosts: list[HostState]) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "corral_ollama_up", "1 if the host answered /api/ps.", labels=["host"]
        )
        loaded = GaugeMetricFamily(
            "corral_ollama_loaded_models", "Models loaded on the host.", labels=["host"]
        )
        model = GaugeMetricFamily(
            "corral_ollama_model_loaded",
            "1 for each model loaded on a host (from /api/ps).",
            labels=["host", "model"],
        )
        vram = GaugeMetricFamily(
            "corral_ollama_model_vram_bytes",
            "GPU memory a loaded model holds.",
            labels=["host", "model"],
        )
        for state in hosts:
            up.add_metric([state.host], 1 if state.up else 0)
            loaded.add_metric([state.host], len(state.models))
            for m in state.models:
                model.add_metric([state.host, m.name], 1)
                vram.add_metric([state.host, m.name], m.vram_bytes)
        yield from (up, loaded, model, vram)

    def _self(self, snap: Snapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "corral_exporter_redis_up",
            "1 if the last Redis read worked.",
            value=1 if snap.ok else 0,
        )
        yield GaugeMetricFamily(
            "corral_exporter_redis_read_seconds",
            "Duration of the last pipelined Redis read.",
            value=snap.read_s,
        )
        yield GaugeMetricFamily(
            "corral_exporter_redis_commands",
            "Redis commands in the last pipelined read.",
            value=snap.commands,
        )
        yield GaugeMetricFamily(
            "corral_exporter_event_receiver_up",
            "1 while the exporter is connected to the task event stream.",
            value=1 if self._receiver_up() else 0,
        )


def top_tenants(counts: dict[str, int], top: int) -> list[tuple[str, int]]:
    """The ``top`` tenants with the most tasks by name, then everyone else as ``other`` (a
    tenant really called so counts there too): a bounded number of series per model."""
    named = sorted(
        ((t, n) for t, n in counts.items() if t != OTHER_TENANTS and n),
        key=lambda item: (-item[1], item[0]),
    )
    rest = sum(counts.values()) - sum(n for _, n in named[:top])
    return [*named[:top], *([(OTHER_TENANTS, rest)] if rest else [])]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
