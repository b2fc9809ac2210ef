"""Pending work per model in Redis: admit, release, position, ETA, cancel.

A task's life here: **admit** (pending, its broker message stored) → **release** (pushed onto
the model's Celery queue with its ledger entry) → **started** (a worker runs it) → **finished**
(its run time feeds the model's mean). Every step is one Lua script (:mod:`.lua`). ``now`` can
be given to each call, so that tests and simulations set the clock.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis

from tasks.broker import end_task_args
from tasks.errors import InvalidRequest, QueueFull
from tasks.keys import (
    KOMBU_UNACKED,
    KOMBU_UNACKED_INDEX,
    SCHED_BOUNDS_KEY,
    SCHED_WEIGHTS_KEY,
    canonical_model,
    queue_name,
    sched_host_key,
    sched_host_models_key,
    sched_released_key,
    sched_running_key,
    sched_state_key,
    sched_tenant_key,
    sched_tenants_key,
    sched_waiting_key,
    task_key,
)
from tasks.scheduler import lua
from tasks.scheduler.messages import ReadyMessage
from tasks.settings import Settings

MAX_PRIORITY = lua.MAX_PRIORITY
DEFAULT_PRIORITY = 5
DEFAULT_TENANT = "default"
MAX_WEIGHT = 1000.0
# Weight of the newest run time in the model's mean: the last ten runs make up about nine
# tenths of it, so it follows a change of prompt mix quickly without jumping on one outlier.
SERVICE_EWMA_WEIGHT = 0.2
MIN_RETRY_AFTER_S = 1.0
UNSERVED_RETRY_AFTER_S = 60.0
_Args = list[str | int | float]  # a script's ARGV
_BACKLOG_HEAD = 6  # commands per model in the first round trip of Scheduler.backlogs
# The message header that says how many units of work a task brings (an embed task: its inputs),
# set by producers for kinds that share calls (TaskKind.units).
UNITS_HEADER = "corral_units"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")


def check_priority(priority: object) -> int:
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not (0 <= priority <= MAX_PRIORITY)
    ):
        raise InvalidRequest(
            f"invalid priority {priority!r}: expected an integer from 0 to {MAX_PRIORITY} "
            f"(higher runs sooner; default {DEFAULT_PRIORITY})",
            field="priority",
        )
    return priority


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise InvalidRequest(
            f"invalid tenant {tenant!r}: expected 1-128 letters, digits or . _ : @ / -, "
            "starting with a letter or digit",
            field="tenant",
        )
    return tenant


def check_weight(weight: object) -> float:
    """A tenant's fair-share weight: a number above 0, at most :data:`MAX_WEIGHT`."""
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not (0 < weight <= MAX_WEIGHT)
    ):
        raise InvalidRequest(
            f"invalid weight {weight!r}: expected a number above 0, at most {MAX_WEIGHT:g}",
            field="weight",
        )
    return float(weight)


def _check_time(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(
            f"invalid {field} {value!r}: expected a Unix time in seconds", field=field
        )
    return float(value)


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, b"", "") else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Admission:
    task_id: str
    model: str
    admitted: bool  # False: refused, the model's queue is at its bound
    known: bool  # the task id was admitted before; nothing changed
    position: int | None  # tasks that start before it (None when refused)
    depth: int  # waiting + released-not-started tasks of the model, this one included
    bound: int
    retry_after_s: float | None  # when refused: about when a place frees
    served: bool = True  # False: refused, nobody serves the model (admit_and_release)

    def raise_if_refused(self) -> None:
        if not self.admitted:
            raise QueueFull(
                f"the queue of {self.model} is full ({self.depth} tasks, bound {self.bound}); "
                f"retry in about {self.retry_after_s:.0f} s, or ask the operator to raise "
                "CORRAL_MAX_QUEUE_DEPTH or this model's bound",
                model=self.model,
                task_id=self.task_id,
                depth=self.depth,
                bound=self.bound,
                retry_after_s=self.retry_after_s,
            )


@dataclass(frozen=True)
class Served:
    """The models a host's workers serve, each with its capacity (the slots of every live worker
    serving it), as the release step takes them: one argument, built once per plan of the hosts
    (:class:`tasks.scheduler.release.HostPlan`) rather than on every release."""

    arg: str  # "model capacity model capacity ...", by name

    @classmethod
    def of(cls, models: Mapping[str, int] | Iterable[str], slots: int) -> Served:
        """From capacities by model, or from names (each with ``slots``)."""
        if not isinstance(models, Mapping):
            models = dict.fromkeys(models, slots)
        served: dict[str, int] = {}
        for model, capacity in models.items():
            name = canonical_model(model)
            served[name] = served.get(name, 0) + max(0, int(capacity))
        return cls(" ".join(f"{name} {served[name]}" for name in sorted(served)))


# What a host serves, as the release methods take it: a Served, capacities, or names.
HostModels = Served | Mapping[str, int] | Iterable[str]


@dataclass(frozen=True)
class HostRelease:
    model: str | None  # the model the host took on last (or its model before this step)
    switches: int  # models the host was given in this step (each a load on the Ollama host)
    task_ids: list[str]

    @property
    def switched(self) -> bool:
        return self.switches > 0


@dataclass(frozen=True)
class HostState:
    model: str | None  # the model it took on last
    since: float | None
    switches: int
    loaded: list[str] = field(default_factory=list)  # what it keeps loaded, as scheduled
    resident: int = 1  # how many models it keeps loaded at once


@dataclass(frozen=True)
class Backlog:
    """A model's scheduling state, for the exporter, Flower and ``corral queues``."""

    model: str
    pending: int
    released: int  # pushed to the Celery queue, not yet started
    running: int
    oldest_wait_s: float  # 0 when nothing is pending
    service_s: float | None  # mean run time
    by_band: dict[int, int] = field(default_factory=dict)  # aged priority → pending tasks
    by_tenant: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AdmitStep:
    """One task's admission, as :meth:`Scheduler.admit_and_release` takes it."""

    message: ReadyMessage
    model: str
    submitted_at: float
    hosts: tuple[tuple[str, HostModels, int], ...]  # each host serving the model
    tenant: str = DEFAULT_TENANT
    priority: int = DEFAULT_PRIORITY
    slots: int = 1  # the model's total: scales a refusal's retry hint
    served_since: tuple[float, float] | None = None
    record: Mapping[str, str | int | float] | None = None
    record_ttl_s: int = 0


class Scheduler:
    """The scheduler's Redis side. ``client`` must be the broker's Redis (same database)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._admit = client.register_script(lua.ADMIT)
        self._release = client.register_script(lua.RELEASE)
        self._release_for_host = client.register_script(lua.RELEASE_FOR_HOST)
        self._position = client.register_script(lua.POSITION)
        self._cancel = client.register_script(lua.CANCEL)
        self._started = client.register_script(lua.STARTED)
        self._finished = client.register_script(lua.FINISHED)
        self._finish_and_release = client.register_script(lua.FINISH_AND_RELEASE)
        self._reindex = client.register_script(lua.REINDEX)
        self._admit_and_release = client.register_script(lua.ADMIT_AND_RELEASE)
        self._note_loaded = client.register_script(lua.NOTE_LOADED)
        self._purge = client.register_script(lua.PURGE_PENDING)
        self._take_along = client.register_script(lua.TAKE_ALONG)

    def _horizon(self, now: float) -> float:
        # A task cannot start after its deadline: released or running entries older than one are
        # leftovers (a message the ledger gave up, a worker that never reported).
        return now - self.settings.task_deadline_s

    # -- admission ------------------------------------------------------------------------
    def admit(
        self,
        message: ReadyMessage,
        *,
        model: str,
        submitted_at: float,
        tenant: str = DEFAULT_TENANT,
        priority: int = DEFAULT_PRIORITY,
        slots: int = 1,
        now: float | None = None,
    ) -> Admission:
        """Enter a task in its model's pending order, unless the model is at its depth bound.

        Atomic: parallel admitters never exceed the bound. ``slots`` (the model's total) only
        scales the retry hint of a refusal (0: nobody serves it, look again in a minute).
        """
        model = self._check_queue(message, model)
        args = self._admit_args(message, model, submitted_at, tenant, priority, now)
        return _admission(message.task_id, model, self._admit(args=args), slots)

    def admit_and_release(
        self,
        message: ReadyMessage,
        *,
        model: str,
        submitted_at: float,
        hosts: Iterable[tuple[str, HostModels, int]],
        tenant: str = DEFAULT_TENANT,
        priority: int = DEFAULT_PRIORITY,
        slots: int = 1,
        served_since: tuple[float, float] | None = None,
        record: Mapping[str, str | int | float] | None = None,
        record_ttl_s: int = 0,
        now: float | None = None,
    ) -> tuple[Admission, list[str]]:
        """:meth:`admit` (without the position), write the task's ``record`` (its hash,
        :func:`tasks.keys.task_key`, expiring after ``record_ttl_s``), publish the message's held
        task-sent events if it was admitted now, then release for ``hosts`` (each: host, what it
        serves, its slots, as :meth:`release_for_host` takes them), all in one step.

        With ``served_since`` (:func:`tasks.scheduler.served.served_since`), a model not served
        or offered since then is refused first (``Admission.served`` is False). A refused task
        writes and releases nothing. Returns the admission and the ids of the tasks released."""
        step = AdmitStep(
            message,
            model=model,
            submitted_at=submitted_at,
            hosts=tuple(hosts),
            tenant=tenant,
            priority=priority,
            slots=slots,
            served_since=served_since,
            record=record,
            record_ttl_s=record_ttl_s,
        )
        return self.run_admission(step, now=now)

    def run_admission(
        self, step: AdmitStep, *, now: float | None = None
    ) -> tuple[Admission, list[str]]:
        """:meth:`admit_and_release` for one step."""
        args = self._admit_and_release_args(step, self._now(now))
        return self._admitted(step, self._admit_and_release(args=args))

    def run_admissions(
        self, steps: Sequence[AdmitStep], *, now: float | None = None
    ) -> list[tuple[Admission, list[str]]]:
        """:meth:`run_admission` for each step, in order, in one pipelined round trip.

        Each step is its own script call: one refused task does not stop the others."""
        if not steps:
            return []
        now = self._now(now)
        pipe = self.redis.pipeline(transaction=False)
        for step in steps:
            self._admit_and_release(args=self._admit_and_release_args(step, now), client=pipe)
        answers = pipe.execute()
        return [self._admitted(step, answer) for step, answer in zip(steps, answers, strict=True)]

    def _admit_and_release_args(self, step: AdmitStep, now: float) -> _Args:
        message = step.message
        model = self._check_queue(message, step.model)
        args = self._admit_args(
            message, model, step.submitted_at, step.tenant, step.priority, now, place=False
        )
        args += ["", ""] if step.served_since is None else [repr(t) for t in step.served_since]
        fields = [value for pair in (step.record or {}).items() for value in pair]
        key = "" if step.record is None else task_key(message.task_id)
        args += [key, step.record_ttl_s, len(fields) // 2, *fields]
        args.append(len(message.events))
        for topic, event in message.events:
            args += [topic, event]
        for host, models, host_slots in step.hosts:
            release = self._release_for_host_args(host, models, host_slots, now)
            args += [len(release), *release]
        return args

    @staticmethod
    def _admitted(step: AdmitStep, reply: Any) -> tuple[Admission, list[str]]:
        outcome, position, depth, bound, service, *released = reply
        answer = (outcome, position, depth, bound, service)
        model = canonical_model(step.model)
        admission = _admission(step.message.task_id, model, answer, step.slots)
        return admission, [_text(t) for t in released]

    def _check_queue(self, message: ReadyMessage, model: str) -> str:
        model = canonical_model(model)
        if message.queue != queue_name(model):
            raise InvalidRequest(
                f"the message goes to {message.queue!r}, not to the queue of {model!r}; build "
                "it for the model's queue (tasks.keys.queue_name)",
                field="model",
            )
        return model

    def _admit_args(
        self,
        message: ReadyMessage,
        model: str,
        submitted_at: float,
        tenant: str,
        priority: int,
        now: float | None,
        *,
        place: bool = True,
    ) -> _Args:
        now = self._now(now)
        return [
            message.task_id,
            canonical_model(model),
            check_tenant(tenant),
            check_priority(priority),
            repr(_check_time(submitted_at, "submitted_at")),
            repr(now),
            repr(self.settings.priority_aging_s),
            self.settings.max_queue_depth,
            message.ledger_entry,
            message.delivery_tag,
            repr(self._horizon(now)),
            "1" if place else "",
        ]

    def cancel(self, task_id: str) -> str | None:
        """Remove a pending task at once (it never reaches Celery).

        Returns the state it was in: ``pending`` (now removed), ``released`` or ``running``
        (cancel it the usual way), or None when the scheduler does not know it.
        """
        state = self._cancel(args=[task_id])
        return _text(state) if state else None

    def purge(self, model: str) -> list[str]:
        """Remove every pending task of ``model`` and end each as cancelled ("queue purged"),
        in one step; returns their ids (see :func:`tasks.queues.purge_model`)."""
        ends = end_task_args(
            log_maxlen=self.settings.stream_maxlen, log_ttl_s=self.settings.stream_ttl_s
        )
        return [_text(t) for t in self._purge(args=[*ends, canonical_model(model)])]

    # -- release --------------------------------------------------------------------------
    def release(
        self, model: str, slots: int, *, capacity: int | None = None, now: float | None = None
    ) -> list[str]:
        """Push up to ``slots`` next tasks of ``model`` onto its Celery queue, in order.

        With ``capacity`` (the model's slots over all its workers), no more than ``capacity``
        tasks are released or running at once, counted in the same atomic step.
        """
        now = self._now(now)
        aging, horizon = repr(self.settings.priority_aging_s), repr(self._horizon(now))
        limit = "" if capacity is None else capacity
        args: _Args = [canonical_model(model), max(0, slots), repr(now), aging, horizon, limit]
        return [_text(t) for t in self._release(args=args)]

    def release_for_host(
        self, host: str, models: HostModels, slots: int, *, now: float | None = None
    ) -> HostRelease:
        """Release for an Ollama host with ``slots`` in all, serving ``models`` (each with its
        capacity: the slots of every live worker serving it; a plain list gives each ``slots``),
        keeping the host on its loaded models (see docs/scheduling.md, "Model affinity").
        The step reads only the served models with work (pending, or tasks on this host)."""
        args = self._release_for_host_args(host, models, slots, self._now(now))
        return _host_release(self._release_for_host(args=args))

    def _release_for_host_args(
        self, host: str, models: HostModels, slots: int, now: float
    ) -> _Args:
        aging, horizon = repr(self.settings.priority_aging_s), repr(self._horizon(now))
        wait = repr(self.settings.max_model_wait_s)
        served = models if isinstance(models, Served) else Served.of(models, slots)
        return [host, max(0, slots), repr(now), aging, horizon, wait, served.arg]

    def reindex(self, host: str) -> int:
        """Rebuild the indexes a release reads (the models with pending work, and those with
        tasks released for or running on ``host``) from what they index; returns how many
        entries were wrong. A worker runs it at its start and now and then (:mod:`.upkeep`), so
        that work admitted before the indexes existed is found."""
        return int(self._reindex(args=[host]))

    def take_along(
        self, model: str, task_name: str, units: int, *, now: float | None = None
    ) -> list[str]:
        """Take the next pending tasks of ``model`` out of its order, while they run
        ``task_name`` and fit in ``units`` (their :data:`UNITS_HEADER`), for a running task to
        serve in its own calls; returns their ledger entries (``[queue key, message]``), each
        message recorded as delivered to this worker and unacknowledged (:data:`lua.TAKE_ALONG`).
        """
        if units < 1:
            return []
        now = self._now(now)
        aging, horizon = repr(self.settings.priority_aging_s), repr(self._horizon(now))
        args: _Args = [canonical_model(model), repr(now), aging, horizon, task_name]
        args += [UNITS_HEADER, units]
        keys = [KOMBU_UNACKED, KOMBU_UNACKED_INDEX]
        return [_text(m) for m in self._take_along(keys=keys, args=args)]

    def note_loaded(
        self,
        host: str,
        models: str | Iterable[str],
        *,
        resident: int | None = None,
        now: float | None = None,
    ) -> bool:
        """Record what the host has loaded (its ``/api/ps``) and how many models it keeps
        loaded at once, without counting a switch. The loaded models are taken only while the
        host runs nothing the scheduler released (else its own dispatch is the truer picture);
        returns whether they were."""
        names = [models] if isinstance(models, str) else list(models)
        loaded = [canonical_model(m) for m in names]
        keep = "" if resident is None else max(1, int(resident))
        args: _Args = [host, repr(self._now(now)), keep, *loaded]
        return bool(self._note_loaded(args=args))

    def host_state(self, host: str) -> HostState:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(sched_host_key(host))
        pipe.zrange(sched_host_models_key(host), 0, -1)
        raw, loaded = pipe.execute()
        model = raw.get(b"model")
        return HostState(
            _text(model) if model else None,
            _float(raw.get(b"since")),
            int(raw.get(b"switches", 0)),
            sorted(_text(m) for m in loaded),
            int(raw.get(b"resident", 1)),
        )

    # -- a task's progress ----------------------------------------------------------------
    def started(self, task_id: str, *, host: str = "", now: float | None = None) -> bool:
        """A worker (calling Ollama ``host``) starts the task; False if the scheduler does not
        know it."""
        return bool(self._started(args=[task_id, repr(self._now(now)), host]))

    def finished(
        self, task_id: str, model: str, run_s: float | None = None, *, now: float | None = None
    ) -> float | None:
        """The task ended; its run time (measured since :meth:`started` when not given) updates
        the model's mean. Returns the new mean, if any."""
        return _float(self._finished(args=self._finished_args(task_id, model, run_s, now)))

    def _finished_args(
        self, task_id: str, model: str, run_s: float | None, now: float | None
    ) -> _Args:
        run, at = "" if run_s is None else repr(float(run_s)), repr(self._now(now))
        return [task_id, canonical_model(model), run, at, SERVICE_EWMA_WEIGHT]

    def finish_args(
        self,
        task_id: str,
        model: str,
        release: tuple[str, HostModels, int] | None,
        *,
        now: float | None = None,
    ) -> _Args:
        """The ARGV of :data:`lua.FINISH_AND_RELEASE`: :meth:`finished` (run time measured
        since :meth:`started`), then, with ``release`` (host, what it serves, its slots),
        :meth:`release_for_host` into the freed slot. A worker's lease end takes them too
        (:meth:`tasks.lifecycle.Lease.release`), to do it all in one step."""
        now = self._now(now)
        args = self._finished_args(task_id, model, None, now)
        if release is not None:
            host, models, slots = release
            args += self._release_for_host_args(host, models, slots, now)
        return args

    def finish_and_release(self, args: _Args) -> HostRelease | None:
        """Run :meth:`finish_args`' step; the release's outcome, if there was one."""
        answer = self._finish_and_release(args=args)
        return _host_release(answer) if answer else None

    def position(self, task_id: str, *, now: float | None = None) -> int | None:
        """How many tasks of its model start before this one (0 = next); None once started."""
        found = self.locate(task_id, now=now)
        return found.position if found else None

    def eta(self, task_id: str, slots: int, *, now: float | None = None) -> float | None:
        """Seconds until the task starts, from its position, the model's ``slots`` and its mean
        run time; None once started, or before any run time was measured."""
        found = self.locate(task_id, now=now)
        return found.eta_s(slots) if found else None

    def locate(self, task_id: str, *, now: float | None = None) -> Located | None:
        """All that position and ETA need, in one step; None once started or unknown."""
        args = locate_args(task_id, self._now(now), self.settings.priority_aging_s)
        return parse_located(self._position(args=args))

    # -- settings kept in Redis -----------------------------------------------------------
    def set_depth_bound(self, model: str, bound: int | None) -> None:
        """Override CORRAL_MAX_QUEUE_DEPTH for one model (None: back to the setting)."""
        model = canonical_model(model)
        if bound is None:
            self.redis.hdel(SCHED_BOUNDS_KEY, model)
            return
        if isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0:
            raise InvalidRequest(
                f"invalid bound {bound!r}: expected a positive integer", field="bound"
            )
        self.redis.hset(SCHED_BOUNDS_KEY, model, bound)

    def set_tenant_weight(self, tenant: str, weight: float | None) -> None:
        """A tenant's share of a model's slots relative to others (default 1; None: back)."""
        tenant = check_tenant(tenant)
        if weight is None:
            self.redis.hdel(SCHED_WEIGHTS_KEY, tenant)
            return
        self.redis.hset(SCHED_WEIGHTS_KEY, tenant, repr(check_weight(weight)))

    # -- observability --------------------------------------------------------------------
    def pending_counts(self, models: list[str]) -> dict[str, int]:
        """Pending tasks per model (not yet in Celery's queue), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(sched_waiting_key(model))
        return dict(zip(models, (int(n) for n in pipe.execute()), strict=True))

    def backlog(self, model: str, *, now: float | None = None) -> Backlog:
        """Counts by aged priority band and by tenant: O(tenants) commands, two round trips."""
        return self.backlogs([canonical_model(model)], now=now)[0]

    def backlogs(self, models: list[str], *, now: float | None = None) -> list[Backlog]:
        """:meth:`backlog` of many models, still in two round trips: O(models + tenants).

        ``models`` are taken as named (canonical, as queue listings give them): a name the
        scheduler never saw has an empty backlog, not an error."""
        now = self._now(now)
        pipe = self.redis.pipeline(transaction=False)
        for model in models:
            pipe.zcard(sched_waiting_key(model))
            pipe.zcard(sched_released_key(model))
            pipe.zcard(sched_running_key(model))
            pipe.zrange(sched_waiting_key(model), 0, 0, withscores=True)
            pipe.hget(sched_state_key(model), "service_s")
            pipe.smembers(sched_tenants_key(model))
        heads = pipe.execute()
        aging = self.settings.priority_aging_s
        names: list[list[str]] = []
        for i, model in enumerate(models):
            tenants = sorted(_text(t) for t in heads[(i + 1) * _BACKLOG_HEAD - 1])
            names.append(tenants)
            for tenant in tenants:
                pipe.zcard(sched_tenant_key(model, tenant))
                for band in range(1, MAX_PRIORITY + 1):  # tasks at this band or above
                    pipe.zcount(sched_tenant_key(model, tenant), "-inf", repr(now - band * aging))
        counts = iter(pipe.execute())
        backlogs = []
        for i, model in enumerate(models):
            row = heads[i * _BACKLOG_HEAD : (i + 1) * _BACKLOG_HEAD]
            pending, released, running, oldest, service, _ = row
            by_band = dict.fromkeys(range(MAX_PRIORITY + 1), 0)
            by_tenant = {}
            for tenant in names[i]:
                total, *at_least = (int(next(counts)) for _ in range(MAX_PRIORITY + 1))
                by_tenant[tenant] = total
                cumulative = [total, *at_least, 0]
                for band in range(MAX_PRIORITY + 1):
                    by_band[band] += cumulative[band] - cumulative[band + 1]
            backlogs.append(
                Backlog(
                    model=model,
                    pending=int(pending),
                    released=int(released),
                    running=int(running),
                    oldest_wait_s=max(0.0, now - oldest[0][1]) if oldest else 0.0,
                    service_s=_float(service),
                    by_band=by_band,
                    by_tenant=by_tenant,
                )
            )
        return backlogs

    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else float(now)


def _admission(task_id: str, model: str, answer: Any, slots: int) -> Admission:
    """An :class:`Admission` from ADMIT's answer; ``slots`` scales a refusal's retry hint."""
    outcome, position, depth, bound, service = answer
    admitted = _text(outcome) not in ("full", "unserved")
    retry_after = None
    if not admitted:
        retry_after = max(MIN_RETRY_AFTER_S, (_float(service) or 0.0) / max(1, slots))
        if slots <= 0:  # no live worker serves the model: nothing frees a place soon
            retry_after = UNSERVED_RETRY_AFTER_S
    return Admission(
        task_id=task_id,
        model=model,
        admitted=admitted,
        known=_text(outcome) == "known",
        position=int(position) if admitted and int(position) >= 0 else None,
        depth=int(depth),
        bound=int(bound),
        retry_after_s=retry_after,
        served=_text(outcome) != "unserved",
    )


def _host_release(answer: Any) -> HostRelease:
    chosen, switches, *tasks = answer
    return HostRelease(_text(chosen) or None, int(switches), [_text(t) for t in tasks])


class Located(NamedTuple):
    """Where a waiting task stands, as the POSITION script reports it."""

    position: int  # tasks of its model that start before it
    running: int  # tasks of its model running now
    service_s: float | None  # the model's mean run time, once one was measured
    model: str
    released: bool  # in the model's Celery queue already: a free slot takes it next

    def eta_s(self, slots: int) -> float | None:
        """Seconds until the task starts on a model with ``slots`` slots in all."""
        return estimate_start_s(self.position, self.running, self.service_s, slots=slots)


def locate_args(task_id: str, now: float, aging_s: float) -> _Args:
    """ARGV of :data:`lua.POSITION` (shared with the asyncio readers of the gateway)."""
    return [task_id, repr(float(now)), repr(float(aging_s))]


def parse_located(found: Any) -> Located | None:
    """The POSITION script's reply: None once the task started, ended or is unknown."""
    if not found:
        return None
    position, running, service, model, state = found
    return Located(
        int(position), int(running), _float(service), _text(model), _text(state) == "released"
    )


def backlog_commands(models: int, tenants: int) -> int:
    """Redis commands of :meth:`Scheduler.backlogs` for ``models`` with ``tenants`` in all."""
    return _BACKLOG_HEAD * models + (MAX_PRIORITY + 1) * tenants


def estimate_start_s(
    position: int, running: int, service_s: float | None, *, slots: int
) -> float | None:
    """Seconds until the task ``position`` places back starts: the first free slots take the
    first tasks at once; after that, one of ``slots`` frees every ``service_s / slots``."""
    if service_s is None:
        return None
    slots = max(1, slots)
    free = max(0, slots - running)
    if position < free:
        return 0.0
    return (position + 1 - free) * service_s / slots
