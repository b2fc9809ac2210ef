"""The Celery app that workers, Flower and ``celery -A tasks.worker_app`` load.

Configuration is read when Celery first needs it, not at import.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from tasks.app import celery_config, check_celery_environment
from tasks.broker import adopt_old_priority_lists
from tasks.definitions import CorralTask, register_tasks
from tasks.keys import model_of_queue
from tasks.model_check import warn_missing_models
from tasks.registry import new_info, start_announcing
from tasks.scheduler.upkeep import HostWatch, start_upkeep
from tasks.settings import load_settings

log = logging.getLogger("corral.worker")
app = Celery("corral", set_as_current=True)


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    check_celery_environment()
    settings = load_settings()
    sender.conf.update(celery_config(settings))
    CorralTask.settings = settings


register_tasks(app)


@worker_ready.connect
def _announce(sender: Any, **_: Any) -> None:
    """Tell Redis which queues this worker serves and which Ollama host it calls."""
    consumer = sender  # the worker's Consumer
    CorralTask.consumer = consumer  # see CorralTask.consuming()
    node = consumer.hostname
    queues = sorted(q.name for q in consumer.task_consumer.queues) if consumer.task_consumer else []
    rt = CorralTask.runtime_for(app)
    info = new_info(
        node,
        queues,
        int(app.conf.worker_concurrency or 1),
        str(app.conf.worker_pool or "threads"),
        rt.ollama.base_url,
    )
    stop = start_announcing(rt.redis, info)
    worker_shutting_down.connect(lambda **_: stop.set(), weak=False)
    # Release for this worker's Ollama host on a timer, and watch what the host has loaded.
    watch = HostWatch(rt.scheduler, rt.ollama.base_url, rt.ollama.get_json)
    upkeep = start_upkeep(rt.releaser, watch)
    worker_shutting_down.connect(lambda **_: upkeep.set(), weak=False)


@worker_ready.connect
def _adopt_old_priority_lists(sender: Any, **_: Any) -> None:
    """Serve what an earlier version left in kombu's priority sub-lists of these queues."""
    consumer = sender
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    moved, _fixed = adopt_old_priority_lists(CorralTask.runtime_for(app).redis, queues)
    if moved:
        log.warning("moved %d messages from old priority sub-lists onto their queues", moved)


@worker_ready.connect
def _check_models(sender: Any, **_: Any) -> None:
    """Warn about served models the Ollama host lacks (in a thread: the host may be slow)."""
    consumer = sender
    queues = [q.name for q in consumer.task_consumer.queues] if consumer.task_consumer else []
    models = sorted(model_of_queue(q) for q in queues)
    ollama = CorralTask.runtime_for(app).ollama
    threading.Thread(
        target=warn_missing_models, args=(ollama, models), name="model-check", daemon=True
    ).start()


@worker_ready.connect
def _deliver_webhooks(sender: Any, **_: Any) -> None:
    """Send due webhooks from the outbox, in threads of their own (never a task slot's)."""
    from tasks.webhooks.deliverer import Deliverer  # the HTTP parts load in workers only

    rt = CorralTask.runtime_for(app)
    deliverer = Deliverer(rt.redis, rt.settings)
    deliverer.start()
    worker_shutting_down.connect(lambda **_: deliverer.stop(), weak=False)
