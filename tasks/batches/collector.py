"""Following a batch's tasks: their outcomes written as they end, expiry, and the final status.

A :class:`Collector` step reads the stored outcomes of the batch's open tasks (one MGET per
500), writes the finished ones through the batch's :class:`Writer`, stops the batch when its
completion window has passed, and gives it its final status once nothing is open. Any process
may run steps (the SDK or CLI waiting on the batch, anyone asking its status): only the holder
of the writer lock writes, and every write is idempotent, so a step can die anywhere and the
next one, in this process or another, carries on from what Redis says.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import redis
from celery.backends.base import Backend

from tasks.batches import output
from tasks.batches.records import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FINALIZING,
    VALIDATING,
    WEBHOOK_TYPES,
    BatchInfo,
    Records,
    load,
    text,
    webhook_id,
)
from tasks.batches.store import ERRORS, OUTPUT, Entry, LostWriter, Writer
from tasks.errors import CorralError, TaskCancelled, TaskTimeout
from tasks.keys import (
    BATCHES_ACTIVE_KEY,
    batch_done_key,
    batch_errors_key,
    batch_key,
    batch_lines_key,
    batch_open_key,
    batch_output_key,
    batch_rejected_key,
)
from tasks.lifecycle import request_cancel
from tasks.settings import Settings
from tasks.webhooks import queue_webhook

SCAN_COUNT = 500  # open tasks read per round trip
ENDED = ("SUCCESS", "FAILURE", "REVOKED")


def cancel_tasks(
    client: redis.Redis, backend: Backend, task_ids: list[str], ttl_s: int, why: str
) -> None:
    """Stop tasks: queued ones end now (they never run), running ones within a chunk."""
    for task_id in task_ids:
        if request_cancel(client, task_id, ttl_s) == "queued":
            backend.mark_as_failure(task_id, TaskCancelled(f"the batch was {why}", task_id=task_id))


def open_task_ids(client: redis.Redis, batch_id: str) -> list[str]:
    return [text(k) for k in client.hkeys(batch_open_key(batch_id))]


class Collector:
    """Steps through one batch's outcomes; keep it (and its lock) while waiting on the batch."""

    def __init__(
        self, client: redis.Redis, backend: Backend, settings: Settings, batch_id: str
    ) -> None:
        self.redis = client
        self.backend = backend
        self.settings = settings
        self.batch_id = batch_id
        self.records = Records(client)
        self._writer: Writer | None = None
        self._swept = False  # open tasks were asked to stop by this collector

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def step(self) -> BatchInfo:
        """Write what finished, expire or finish the batch when due; the batch as it is now."""
        info = load(self.redis, self.batch_id)
        if info.ended:
            return info
        if self._writer is None:
            self._writer = Writer(self.redis, info, self.settings.batch_dir)
        if not self._writer.hold():
            return info  # another live process writes this batch's outcomes
        try:
            if info.stop is None and time.time() >= info.expires_at:
                self.records.stop(self.batch_id, "expired")
                info = load(self.redis, self.batch_id)
            if info.stop is not None and not self._swept:
                cancel_tasks(
                    self.redis,
                    self.backend,
                    open_task_ids(self.redis, self.batch_id),
                    self.settings.result_ttl_s,
                    info.stop,
                )
                self._swept = True
            self._collect(info)
            info = load(self.redis, self.batch_id)
            if self._finished(info):
                info = self._finalize(info)
        except LostWriter:
            pass  # our lock lapsed and another process took over: it carries on
        return info

    def _collect(self, info: BatchInfo) -> None:
        assert self._writer is not None
        for chunk in _chunks(
            self.redis.hscan_iter(batch_open_key(self.batch_id), count=SCAN_COUNT)
        ):
            task_ids = [k.decode() for k, _ in chunk]
            metas = self.backend.client.mget([self.backend.get_key_for_task(t) for t in task_ids])
            entries = []
            for (raw_id, raw_line), meta in zip(chunk, metas, strict=True):
                if meta is None:
                    continue
                decoded = self.backend.decode_result(meta)
                if decoded.get("status") not in ENDED:
                    continue
                line = json.loads(raw_line)
                entries.append(self._entry(raw_id.decode(), line, decoded, info.stop))
            self._writer.write(entries)

    def _entry(
        self, task_id: str, line: dict[str, Any], meta: dict[str, Any], stop: str | None
    ) -> Entry:
        custom_id = line["custom_id"]
        if meta["status"] == "SUCCESS":
            body = output.succeeded(task_id, custom_id, line, meta["result"], int(time.time()))
            return Entry(custom_id, task_id, OUTPUT, output.dumps(body), "completed")
        error = self.backend.exception_to_python(meta["result"])
        # Stopped by the batch: cancelled, or out of time (a deadline follows the window).
        out_of_time = stop == "expired" and isinstance(error, TaskTimeout)
        if stop is not None and (isinstance(error, TaskCancelled) or out_of_time):
            body = output.stopped(task_id, custom_id, stop)
        else:
            if not isinstance(error, CorralError):
                error = CorralError(f"task {task_id} failed: {error!r}", task_id=task_id)
            body = output.failed(task_id, custom_id, error)
        return Entry(custom_id, task_id, ERRORS, output.dumps(body), "failed")

    def _finished(self, info: BatchInfo) -> bool:
        if info.status == VALIDATING and info.stop is None:
            return False  # lines are still being submitted
        return not self.redis.hlen(batch_open_key(self.batch_id))

    def _finalize(self, info: BatchInfo) -> BatchInfo:
        """Close the store and give the final status; the batch's keys then expire."""
        assert self._writer is not None
        now = time.time()
        key = batch_key(self.batch_id)
        self.redis.hset(key, mapping={"status": FINALIZING, "finalizing_at": now})
        self._writer.close_files()
        final = {None: COMPLETED, "cancelled": CANCELLED, "expired": EXPIRED}[info.stop]
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"status": final, f"{final}_at": now})
        pipe.zrem(BATCHES_ACTIVE_KEY, self.batch_id)
        if info.callback_url:
            # In the same transaction as the final status, under one id per batch: a process
            # that dies after it leaves nothing to redo, and a second finalizer (its lock
            # lapsed meanwhile) enqueues nothing more.
            ended = replace(info, status=final, times={**info.times, f"{final}_at": now})
            queue_webhook(
                pipe,
                webhook_id(self.batch_id),
                info.callback_url,
                WEBHOOK_TYPES[final],
                ended.to_openai(),
            )
        for name in (
            key,
            batch_lines_key(self.batch_id),
            batch_open_key(self.batch_id),
            batch_done_key(self.batch_id),
            batch_output_key(self.batch_id),
            batch_errors_key(self.batch_id),
            batch_rejected_key(self.batch_id),
        ):
            pipe.expire(name, self.settings.batch_ttl_s)
        pipe.execute()
        self._writer.close()
        return load(self.redis, self.batch_id)


def _chunks(items: Any) -> Any:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == SCAN_COUNT:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
