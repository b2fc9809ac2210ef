"""Webhooks: a task's (or a batch's) end POSTed to the URL its submitter named.

- :mod:`tasks.webhooks.urls`: which callback URLs are allowed (no server-side request forgery);
- :mod:`tasks.webhooks.outbox`: the durable outbox in Redis, and :func:`enqueue_webhook`;
- :mod:`tasks.webhooks.deliverer`: the thread in each worker that signs and sends (it imports
  the HTTP parts, so it is not imported here: producers never load them).
"""

from tasks.webhooks.outbox import (
    Webhook,
    dead_webhooks,
    enqueue_webhook,
    pending_webhooks,
    queue_task_webhook,
    queue_webhook,
    retry_dead,
)
from tasks.webhooks.urls import check_callback_url

__all__ = [
    "Webhook",
    "check_callback_url",
    "dead_webhooks",
    "enqueue_webhook",
    "pending_webhooks",
    "queue_task_webhook",
    "queue_webhook",
    "retry_dead",
]
