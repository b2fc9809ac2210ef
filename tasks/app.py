"""The Celery application and its configuration, built from :class:`tasks.settings.Settings`."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from tasks import broker
from tasks.errors import InvalidSetting
from tasks.keys import PRIORITY_STEPS, QUEUE_PREFIX
from tasks.result_backend import backend_url
from tasks.settings import Settings, load_settings

# Celery reads these from the environment *over* the app's own configuration.
_OVERRIDING_ENV = (
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "CELERY_BROKER_READ_URL",
    "CELERY_BROKER_WRITE_URL",
)


def check_celery_environment() -> None:
    """Refuse ``CELERY_*`` variables that would silently override CORRAL_REDIS_URL."""
    found = [name for name in _OVERRIDING_ENV if os.environ.get(name)]
    if found:
        raise InvalidSetting(
            f"{', '.join(found)} is set and would override CORRAL_REDIS_URL inside Celery; "
            "unset it and configure ollama-corral with CORRAL_REDIS_URL only",
            field=found[0],
        )


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings. Why each one matters is told in README, section 'Delivery'."""
    broker.install()  # kombu's Redis transport, minus the message it can drop
    restore_interval_s = max(1, settings.visibility_timeout_s // 4)
    return {
        "broker_url": settings.redis_url,
        "result_backend": backend_url(settings.redis_url),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # No STARTED write to the result backend (a GET, a SET and a PUBLISH per task): the
        # task record's state and the stream's `start` event say that a task runs.
        "task_track_started": False,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "result_extended": True,
        "result_expires": settings.result_ttl_s,
        "task_create_missing_queues": True,
        "task_default_queue": QUEUE_PREFIX + "default",
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # sweep for messages of dead workers often enough to honour the timeout above
            "unacked_restore_interval": restore_interval_s,
            "unacked_restore_throttle": 1,  # kombu's default scans on every 10th sweep only
            # The sweep's lock outlives a sweeper that dies holding it (SIGKILL, Redis restart):
            # kombu's 300 s would stall every recovery for five minutes.
            "unacked_mutex_expire": restore_interval_s * 2,
            # One list per queue: the scheduler orders the work, so kombu's priority sub-lists
            # would only multiply the lists every worker blocks on (docs/scheduling.md).
            "priority_steps": list(PRIORITY_STEPS),
            # the replay log of a task that a purge ends (tasks/broker.py)
            "corral_stream_maxlen": settings.stream_maxlen,
            "corral_stream_ttl_s": settings.stream_ttl_s,
        },
        "result_backend_transport_options": {"retry_policy": {"timeout": 10.0}},
        # Celery does not retry its own result writes by default: a Redis blip while it marks a
        # task STARTED would fail the task with a bare ConnectionError. Retry for about a minute.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 60,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "redis_backend_health_check_interval": 10,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Malformed messages end typed instead of being dropped or stopping the worker.
        "worker_consumer": "tasks.malformed:Consumer",
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None, *, main: str = "corral") -> Celery:
    """A Celery app configured for ollama-corral (settings from the environment if not given)."""
    check_celery_environment()
    settings = settings or load_settings()
    app = Celery(main, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
