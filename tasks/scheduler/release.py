"""When and how much to release: per Ollama host, within the slots of the live workers.

Producers release right after admitting, and workers after each task and on a timer, so a
lost trigger only delays. All of them release per Ollama host (:meth:`Scheduler.release_for_host`),
so that workers sharing a host, one serving several models or one per model, keep it on its
loaded models. What a host serves and how many slots each model has comes from the workers'
announcements (:mod:`tasks.registry`, found through their index), read at most every
``refresh_s`` seconds.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

from tasks.keys import canonical_model, model_of_queue
from tasks.registry import WorkerInfo, live_workers
from tasks.scheduler.pending import HostRelease, Scheduler, Served

PLAN_REFRESH_S = 5.0  # workers announce every 5 s: a plan is as fresh as their announcements


@dataclass(frozen=True)
class HostPlan:
    """An Ollama host as its live workers describe it."""

    host: str
    slots: int  # of every live worker calling this host
    capacity: dict[str, int] = field(default_factory=dict)  # model → slots of all its workers

    @cached_property
    def served(self) -> Served:
        """:attr:`capacity` as the release step takes it, built once per plan."""
        return Served.of(self.capacity, self.slots)


def plan_hosts(workers: list[WorkerInfo]) -> dict[str, HostPlan]:
    """Each Ollama host with its slots and the models its workers serve. A model's capacity
    counts the slots of every live worker serving it, on any host: the released and running
    tasks it is compared with are counted over all hosts too."""
    capacity: dict[str, int] = {}
    for worker in workers:
        for queue in worker.queues:
            model = model_of_queue(queue)
            capacity[model] = capacity.get(model, 0) + worker.slots
    slots: dict[str, int] = {}
    models: dict[str, set[str]] = {}
    for worker in workers:
        slots[worker.ollama_host] = slots.get(worker.ollama_host, 0) + worker.slots
        models.setdefault(worker.ollama_host, set()).update(
            model_of_queue(q) for q in worker.queues
        )
    return {
        host: HostPlan(host, slots[host], {m: capacity[m] for m in sorted(models[host])})
        for host in slots
    }


class Releaser:
    """Releases pending work for hosts, from a plan of the live workers; thread-safe."""

    def __init__(self, scheduler: Scheduler, refresh_s: float = PLAN_REFRESH_S) -> None:
        self.scheduler = scheduler
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._plan: dict[str, HostPlan] = {}
        self._planned_at = -float("inf")

    def plan(self) -> dict[str, HostPlan]:
        """The hosts of the live workers, at most ``refresh_s`` old."""
        with self._lock:
            if time.monotonic() - self._planned_at > self.refresh_s:
                self._plan = plan_hosts(live_workers(self.scheduler.redis))
                self._planned_at = time.monotonic()
            return self._plan

    def capacity(self, model: str) -> int:
        """The slots of the live workers serving ``model``."""
        model = canonical_model(model)
        return max((p.capacity.get(model, 0) for p in self.plan().values()), default=0)

    def for_host(self, host: str) -> HostRelease | None:
        """Release what ``host`` has room for (None: no live worker calls it)."""
        plan = self.plan().get(host)
        if plan is None:
            return None
        return self.scheduler.release_for_host(plan.host, plan.served, plan.slots)

    def finish_args(self, task_id: str, model: str, host: str) -> list[str | int | float]:
        """:meth:`Scheduler.finish_args` for a task that ended on a worker calling ``host``:
        its place frees, and ``host`` releases into it (unless no live worker calls it)."""
        plan = self.plan().get(host)
        release = None if plan is None else (plan.host, plan.served, plan.slots)
        return self.scheduler.finish_args(task_id, model, release)

    def hosts_for(self, model: str) -> list[tuple[str, Served, int]]:
        """Each host serving ``model``, as :meth:`Scheduler.admit_and_release` takes them."""
        model = canonical_model(model)
        return [(p.host, p.served, p.slots) for p in self.plan().values() if model in p.capacity]

    def for_model(self, model: str) -> list[str]:
        """Release on every host that serves ``model`` (after admitting a task of it)."""
        model = canonical_model(model)
        released: list[str] = []
        for plan in self.plan().values():
            if model in plan.capacity:
                step = self.scheduler.release_for_host(plan.host, plan.served, plan.slots)
                released += step.task_ids
        return released
