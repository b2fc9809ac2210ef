"""The deliverer: a thread in every worker process that sends due webhooks from the outbox.

It claims due deliveries (:func:`tasks.webhooks.outbox.claim`) only as fast as its senders free,
signs each attempt as Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature: v1,<HMAC-SHA256>``), and POSTs it with a short timeout from its own small
thread pool: a slow or dead receiver ties up a sender, never a task slot. A 2xx answer ends the
delivery; anything else schedules the next attempt after an exponential backoff, or moves the
delivery to the dead letters once ``CORRAL_WEBHOOK_ATTEMPTS`` are spent.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial

import redis
from standardwebhooks import Webhook

from tasks.settings import Settings
from tasks.webhooks import outbox
from tasks.webhooks.urls import peer_allowed
from workers.webhook_http import WebhookPoster

log = logging.getLogger("corral.webhooks")

POLL_S = 0.1  # how often an idle deliverer looks for due deliveries (one script call)
USER_AGENT = "ollama-corral-webhooks"


def backoff_s(attempt: int, settings: Settings) -> float:
    """The wait after failed attempt number ``attempt`` (1, 2, ...)."""
    return float(
        min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s)
    )


class Deliverer:
    """Sends due webhooks until stopped. ``start()`` runs it in a daemon thread."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        secret = settings.webhook_secret
        self._signer = Webhook(secret.get_secret_value()) if secret is not None else None
        senders = settings.webhook_senders
        self._poster = WebhookPoster(
            partial(peer_allowed, allowed_hosts=settings.webhook_hosts),
            settings.webhook_timeout_s,
            pool_size=senders,
        )
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="webhook")
        self._free = threading.Semaphore(senders)
        self._senders = senders
        # A claim outlives an attempt (connect, send, read), so it lapses only if we died.
        self.lease_s = 3 * settings.webhook_timeout_s + 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> threading.Event:
        """Run in a daemon thread; set the returned event to stop it."""
        self._thread = threading.Thread(target=self.run, name="webhooks", daemon=True)
        self._thread.start()
        return self._stop

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        if self._signer is None:
            log.warning(
                "CORRAL_WEBHOOK_SECRET is not set: this worker sends no webhooks (they "
                "wait in the outbox for a worker that has the secret)"
            )
            return
        while not self._stop.is_set():
            try:
                sent = self.step()
            except redis.RedisError as exc:
                log.warning("webhook outbox unreachable (%s); trying again", exc)
                sent = 0
                self._stop.wait(1.0)
            if not sent:
                self._stop.wait(POLL_S)

    def step(self) -> int:
        """Claim as many due deliveries as there are free senders and start sending them."""
        free = 0
        while free < self._senders and self._free.acquire(blocking=False):
            free += 1
        if not free:
            return 0
        claimed = outbox.claim(self.redis, free, self.lease_s)
        for _ in range(free - len(claimed)):
            self._free.release()
        for item in claimed:
            self._pool.submit(self._send, item)
        return len(claimed)

    def _send(self, item: outbox.Claimed) -> None:
        try:
            self.attempt(item)
        except Exception:  # a sender must survive anything; the claim lapses and it is retried
            log.exception("webhook %s: attempt %d failed unexpectedly", item.id, item.attempt)
        finally:
            self._free.release()

    def attempt(self, item: outbox.Claimed) -> None:
        """Send one attempt and record its outcome."""
        signer = self._signer
        if signer is None:  # run() does not start without one
            return
        now = datetime.now(tz=UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": item.id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signer.sign(item.id, now, item.body),
        }
        answer = self._poster.post(item.url, item.body.encode(), headers)
        if answer.ok:
            outbox.delivered(self.redis, item.id)
            return
        if item.attempt >= self.settings.webhook_attempts:
            log.warning(
                "webhook %s to %s given up after %d attempts: %s",
                item.id,
                item.url,
                item.attempt,
                answer.detail,
            )
            outbox.failed(self.redis, item, answer.detail, None)
            return
        retry_at = time.time() + backoff_s(item.attempt, self.settings)
        log.info(
            "webhook %s attempt %d: %s; next attempt in %.0f s",
            item.id,
            item.attempt,
            answer.detail,
            retry_at - time.time(),
        )
        outbox.failed(self.redis, item, answer.detail, retry_at)
