"""The tasks' base class: one worker runtime per process, shared by every kind's task."""

from __future__ import annotations

import dataclasses
import os

from celery import Celery

from tasks.definitions import CorralTask, Delivery, register_tasks
from tasks.kinds import registry
from tasks.settings import Settings


def test_a_worker_process_has_one_runtime_rebuilt_after_a_fork(settings: Settings) -> None:
    celery_app = Celery("worker-task-test", set_as_current=False)
    celery_app.conf.worker_concurrency = 3
    registered = register_tasks(celery_app)
    saved = CorralTask.settings, CorralTask._runtime
    CorralTask.settings, CorralTask._runtime = settings, None
    try:
        first = registered["generate"].runtime
        assert registered["chat"].runtime is first  # one pool for every kind
        assert first.pid == os.getpid() and first.settings is settings
        CorralTask._runtime = dataclasses.replace(first, pid=-1)  # as seen after a fork
        again = registered["structured"].runtime
        assert again is not first and again.pid == os.getpid()
        for runtime in (first, again):
            runtime.redis.close()
            runtime.ollama.close()
    finally:
        CorralTask.settings, CorralTask._runtime = saved


def test_a_delivery_carries_its_deadline_and_its_cancel(settings: Settings) -> None:
    celery_app = Celery("worker-task-test", set_as_current=False)
    register_tasks(celery_app)
    task = celery_app.tasks["corral.chat"]
    saved = CorralTask.settings, CorralTask._runtime
    CorralTask.settings, CorralTask._runtime = settings, None
    task.push_request(id="task-1", hostname="chat@host")
    try:
        delivery = Delivery.receive(task, registry.get("chat"), {"model": "m"}, 1000.0, 30, {})
        assert (delivery.task_id, delivery.worker) == ("task-1", "chat@host")
        assert delivery.deadline == 1030.0
        assert delivery.timings.enqueued_at == 1000.0
        assert delivery.timings.started_at == delivery.started_at
        odd = Delivery.receive(task, registry.get("chat"), None, "yesterday", -5, {"x": 1})
        assert odd.timings.enqueued_at == odd.started_at  # no usable submission time
        assert odd.deadline == odd.started_at + settings.task_deadline_s
        delivery.cancel()
        assert delivery.publisher.cancel_requested and not odd.publisher.cancel_requested
    finally:
        task.pop_request()
        runtime = CorralTask._runtime
        if runtime is not None:
            runtime.redis.close()
            runtime.ollama.close()
        CorralTask.settings, CorralTask._runtime = saved
