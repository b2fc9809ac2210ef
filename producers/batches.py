"""Batches from the SDK: submit a JSONL file (or lines) as tasks, follow it, read its output.

``Client.batch(lines_or_path)`` reads the input a line at a time, submits each valid line as a
task and records each bad one in the error file, then hands back a :class:`Batch`. The batch's
id is derived from the owner, an optional user key and the input's content hash, so submitting
the same file again after a crash resumes the first submission: lines already submitted are
skipped, and each line's idempotency key (batch id + custom_id) stops a line caught between
submission and record from running twice. See docs/batches.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from tasks.batches import (
    DEFAULT_PRIORITY,
    ERRORS,
    OUTPUT,
    STORE_FILE,
    STORE_REDIS,
    VALIDATING,
    BatchInfo,
    Collector,
    InputFile,
    Line,
    Records,
    Rejected,
    cancel_tasks,
    create,
    describe,
    lines_of,
    list_ids,
    load,
    open_task_ids,
    parse,
    read_lines,
    read_output,
    spool,
)
from tasks.batches import output as output_lines
from tasks.errors import (
    BrokerUnavailable,
    InvalidRequest,
    PermanentError,
    QueueFull,
    TaskNotFound,
)
from tasks.keys import queue_name
from tasks.openai.errors import snake_case
from tasks.registry import live_workers

if TYPE_CHECKING:
    from producers.client import Client

DEFAULT_OWNER = "default"
CHUNK_LINES = 100  # lines checked against the record in one round trip
COLLECT_EVERY_S = 2.0  # while submitting, outcomes are written this often
POLL_S = 0.5  # a waiting caller looks at the batch this often
SERVED_RECHECK_S = 2.0
DEADLINE_MARGIN_S = 60.0

Progress = Callable[[BatchInfo], None]


class Batch:
    """A handle on a batch: ``status()``, ``wait()``, ``results()``, ``errors()``, ``cancel()``.

    ``status()`` and ``wait()`` also write the outcomes of finished lines (see docs/batches.md):
    whichever process looks at a batch moves it on, so no separate service is needed.
    """

    def __init__(self, client: Client, batch_id: str) -> None:
        self._client = client
        self.id = batch_id
        self._collector: Collector | None = None

    def __repr__(self) -> str:
        return f"<Batch {self.id}>"

    @property
    def collector(self) -> Collector:
        if self._collector is None:
            self._collector = Collector(
                self._client.redis, self._client.backend, self._client.settings, self.id
            )
        return self._collector

    def info(self) -> BatchInfo:
        """The batch's record as it is, without moving it on."""
        return load(self._client.redis, self.id)

    def status(self) -> BatchInfo:
        """Write the outcomes that arrived, then the batch's status, counters and ETA."""
        return self.collector.step()

    def wait(self, progress: Progress | None = None, timeout: float | None = None) -> BatchInfo:
        """Until the batch ends (completed, failed, expired or cancelled); ``progress`` is called
        with the batch after each look. Interrupting the wait leaves the batch running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outage_since: float | None = None
        try:
            while True:
                try:
                    info = self.status()
                    outage_since = None
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # Redis is restarting: the batch's state is in it, so wait for it to return.
                    outage_since = outage_since or time.monotonic()
                    if time.monotonic() - outage_since > self._client.reconnect_budget_s:
                        raise BrokerUnavailable(
                            f"lost Redis while waiting on batch {self.id}: {exc}; the batch "
                            f"goes on: follow it with `corral batch status {self.id}`"
                        ) from exc
                    self.close()
                    time.sleep(POLL_S)
                    continue
                if progress is not None:
                    progress(info)
                if info.ended:
                    return info
                if deadline is not None and time.monotonic() > deadline:
                    return info
                time.sleep(POLL_S)
        finally:
            self.close()

    def results(self) -> Iterator[dict[str, Any]]:
        """The output lines written so far (the succeeded requests), as OpenAI writes them."""
        return self._lines(OUTPUT)

    def errors(self) -> Iterator[dict[str, Any]]:
        """The error lines written so far: refused lines, failed, cancelled and expired ones."""
        return self._lines(ERRORS)

    def _lines(self, channel: str) -> Iterator[dict[str, Any]]:
        info = self.info()
        for line in read_output(self._client.redis, info, self._client.settings.batch_dir, channel):
            yield parse(line)

    def cancel(self) -> BatchInfo:
        """Stop the batch: queued lines are cancelled at once, running ones stop within one
        chunk; what finished is kept. The batch ends as ``cancelled`` once nothing runs."""
        client = self._client
        answer = Records(client.redis).stop(self.id, "cancelled", "cancelling")
        if answer is None:
            load(client.redis, self.id)  # raises TaskNotFound
        if answer == "stopping":
            cancel_tasks(
                client.redis,
                client.backend,
                open_task_ids(client.redis, self.id),
                client.settings.result_ttl_s,
                "cancelled",
            )
        return self.status()

    def close(self) -> None:
        """Give up writing this batch's outcomes (another process may take over)."""
        if self._collector is not None:
            self._collector.close()
            self._collector = None


def batch_id_of(owner: str, key: str, file_id: str) -> str:
    digest = hashlib.sha256(f"{owner}\0{key}\0{file_id}".encode()).hexdigest()
    return "batch_" + digest[:32]


def submit_batch(
    client: Client,
    lines_or_path: str | Path | Iterable[dict[str, Any] | str],
    *,
    owner: str = DEFAULT_OWNER,
    key: str = "",
    priority: int = DEFAULT_PRIORITY,
    tenant: str | None = None,
    completion_window_s: float | None = None,
    endpoint: str | None = None,
    metadata: dict[str, str] | None = None,
    on_line: Callable[[int], None] | None = None,
) -> Batch:
    """Submit (or resume submitting) a batch; see :meth:`Client.batch`."""
    settings = client.settings
    if not isinstance(priority, int) or not 0 <= priority <= 9:
        raise InvalidRequest(
            f"priority: {priority!r} is not 0-9; batches default to {DEFAULT_PRIORITY}",
            field="priority",
        )
    window = completion_window_s or settings.batch_completion_window_s
    if window <= 0:
        raise InvalidRequest(
            "completion_window: give a positive number of seconds", field="completion_window"
        )
    if isinstance(lines_or_path, str | Path):
        source = describe(Path(lines_or_path).expanduser())
    else:
        source = spool(lines_or_path, settings.batch_dir)
    if source.lines == 0:
        raise InvalidRequest(
            "the batch has no lines; give a JSONL file with one request per line", field="file"
        )
    now = time.time()
    info = BatchInfo(
        id=batch_id_of(owner, key, source.file_id),
        status=VALIDATING,
        owner=owner,
        endpoint=endpoint or "",
        input_file_id=source.file_id,
        completion_window_s=window,
        created_at=now,
        expires_at=now + window,
        priority=priority,
        tenant=tenant or owner,
        store=STORE_REDIS if source.lines <= settings.batch_redis_max_lines else STORE_FILE,
        metadata=dict(metadata or {}),
    )
    if not create(client.redis, info):
        info = load(client.redis, info.id)
        if info.status != VALIDATING:
            return Batch(client, info.id)  # submitted in full already: nothing to resume
    _Submission(client, info, source, on_line).run()
    return Batch(client, info.id)


class _Submission:
    """Reads the input and submits its lines; safe to run again on the same batch."""

    def __init__(
        self,
        client: Client,
        info: BatchInfo,
        source: InputFile,
        on_line: Callable[[int], None] | None,
    ) -> None:
        self.client = client
        self.info = info
        self.source = source
        self.records = Records(client.redis)
        self.on_line = on_line
        self.batch = Batch(client, info.id)
        self._served: set[str] = set()
        self._served_at = 0.0
        self._collected_at = time.monotonic()

    def served(self, model: str) -> bool:
        if model not in self._served and time.monotonic() - self._served_at > SERVED_RECHECK_S:
            self._served = {q for w in live_workers(self.client.redis) for q in w.queues}
            self._served_at = time.monotonic()
        return queue_name(model) in self._served

    def run(self) -> None:
        endpoint = self.info.endpoint or None
        lines = read_lines(lines_of(self.source.path), self.client.settings, self.served, endpoint)
        chunk: list[Line | Rejected] = []
        try:
            for item in lines:
                chunk.append(item)
                if len(chunk) == CHUNK_LINES:
                    if not self._submit(chunk):
                        break
                    chunk = []
            else:
                self._submit(chunk)
            self.records.read_done(self.info.id)
        except redis.RedisError as exc:
            raise BrokerUnavailable(
                f"lost Redis while submitting batch {self.info.id}: {exc}; once it is back, "
                "submit the same input again: the submission resumes where it stopped"
            ) from exc
        finally:
            self.batch.close()

    def _submit(self, chunk: list[Line | Rejected]) -> bool:
        """Submit a chunk's new lines; False once the batch was asked to stop."""
        accepted = [item for item in chunk if isinstance(item, Line)]
        known = self.records.submitted(self.info.id, [line.custom_id for line in accepted])
        already = {line.custom_id for line, was in zip(accepted, known, strict=True) if was}
        for item in chunk:
            if isinstance(item, Rejected):
                line = output_lines.dumps(output_lines.rejected(self.info.id, item))
                self.records.reject(self.info.id, item.entry, line)
            elif item.custom_id not in already and not self._submit_line(item):
                return False
            if self.on_line is not None:
                self.on_line(item.number)
        if time.monotonic() - self._collected_at > COLLECT_EVERY_S:
            self.batch.status()  # write what finished meanwhile
            self._collected_at = time.monotonic()
        return True

    def _submit_line(self, line: Line) -> bool:
        batch_id = self.info.id
        task_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{batch_id}/{line.custom_id}"))
        # A line may wait in its queue until the batch expires; the margin lets the expiry
        # stop it (batch_expired) before its own deadline fails it.
        remaining = max(self.info.expires_at - time.time(), 1.0) + DEADLINE_MARGIN_S
        while True:
            try:
                job = self.client.submit(
                    line.kind,
                    line.data,
                    idempotency_key=f"batch:{batch_id}:{line.custom_id}",
                    task_id=task_id,
                    deadline_s=remaining,
                    **self.order(),
                )
                break
            except QueueFull as exc:  # the model's queue is at its bound: wait for room
                time.sleep(min(float(exc.info.get("retry_after_s") or 1.0), 5.0))
            except PermanentError as exc:  # refused at the door: a bad body, an unserved model
                rejected = Rejected(
                    line.number,
                    line.custom_id,
                    snake_case(type(exc).__name__),
                    f"line {line.number}: {exc.message}",
                )
                text = output_lines.dumps(output_lines.rejected(batch_id, rejected))
                self.records.reject(batch_id, rejected.entry, text)
                return True
        entry = {
            "custom_id": line.custom_id,
            "url": line.url,
            "kind": line.kind,
            "model": line.model,
            "encoding_format": line.encoding_format,
        }
        why = self.records.accept(batch_id, line.custom_id, job.id, entry)
        if why:
            settings = self.client.settings
            cancel_tasks(
                self.client.redis, self.client.backend, [job.id], settings.result_ttl_s, why
            )
            return False
        return True

    def order(self) -> dict[str, Any]:
        """Where the batch's tasks go in their models' order: the batch lane and its tenant."""
        return {"priority": self.info.priority, "tenant": self.info.tenant}


def list_batches(
    client: Client, owner: str = DEFAULT_OWNER, *, after: str | None = None, limit: int = 20
) -> tuple[list[BatchInfo], bool]:
    """An owner's batches, newest first (``after``: the last id of the previous page)."""
    ids, more = list_ids(client.redis, owner, after=after, limit=limit)
    found = []
    for batch_id in ids:
        with contextlib.suppress(TaskNotFound):  # its record expired: listed no more
            found.append(load(client.redis, batch_id))
    return found, more
