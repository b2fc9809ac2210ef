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
import logging
import threading
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
from tasks.batches.records import text
from tasks.errors import (
    BrokerUnavailable,
    CorralError,
    InvalidRequest,
    PermanentError,
    QueueFull,
    TaskNotFound,
)
from tasks.keys import BATCHES_ACTIVE_KEY, batch_submitter_key, queue_name
from tasks.openai.errors import snake_case
from tasks.registry import live_workers
from tasks.webhooks import check_callback_url

if TYPE_CHECKING:
    from producers.client import Client

DEFAULT_OWNER = "default"
CHUNK_LINES = 100  # lines checked against the record in one round trip
COLLECT_EVERY_S = 2.0  # while submitting, outcomes are written this often
POLL_S = 0.5  # a waiting caller looks at the batch this often
SERVED_RECHECK_S = 2.0
DEADLINE_MARGIN_S = 60.0
DRIVE_EVERY_S = 1.0
SUBMITTER_LEASE_MS = 30_000  # a submission unheard of this long is resumed by a driver

Progress = Callable[[BatchInfo], None]
log = logging.getLogger(__name__)


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


def plan_batch(
    client: Client,
    source: InputFile,
    *,
    owner: str = DEFAULT_OWNER,
    key: str = "",
    priority: int = DEFAULT_PRIORITY,
    tenant: str | None = None,
    completion_window_s: float | None = None,
    endpoint: str | None = None,
    metadata: dict[str, str] | None = None,
    callback_url: str | None = None,
    models: list[str] | None = None,
) -> BatchInfo:
    """The record of a new batch over ``source``, its options checked (nothing is stored).
    ``models``: the only models its lines may name (an API key's allow-list)."""
    settings = client.settings
    window = _check_options(client, priority, completion_window_s, callback_url)
    if source.lines == 0:
        raise InvalidRequest(
            "the batch has no lines; give a JSONL file with one request per line", field="file"
        )
    now = time.time()
    return BatchInfo(
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
        callback_url=callback_url,
        input_path=str(source.path.resolve()),
        root=str(settings.batch_dir.expanduser().resolve()),
        models=list(models or []),
        metadata=dict(metadata or {}),
    )


def _check_options(
    client: Client, priority: int, completion_window_s: float | None, callback_url: str | None
) -> float:
    """The completion window in seconds, once every option is checked."""
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
    if callback_url is not None:
        check_callback_url(callback_url, settings)
    return window


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
    callback_url: str | None = None,
    on_line: Callable[[int], None] | None = None,
) -> Batch:
    """Submit (or resume submitting) a batch; see :meth:`Client.batch`."""
    _check_options(client, priority, completion_window_s, callback_url)
    if isinstance(lines_or_path, str | Path):
        source = describe(Path(lines_or_path).expanduser())
    else:
        source = spool(lines_or_path, client.settings.batch_dir)
    info = plan_batch(
        client,
        source,
        owner=owner,
        key=key,
        priority=priority,
        tenant=tenant,
        completion_window_s=completion_window_s,
        endpoint=endpoint,
        metadata=metadata,
        callback_url=callback_url,
    )
    if not create(client.redis, info):
        info = load(client.redis, info.id)
        if info.status != VALIDATING:
            return Batch(client, info.id)  # submitted in full already: nothing to resume
    _Submission(client, info, source, on_line).run()
    return Batch(client, info.id)


def claim_submission(client: Client, batch_id: str) -> bool:
    """Take the submitter's lease of a batch nobody is submitting (True when taken)."""
    key = batch_submitter_key(batch_id)
    return bool(client.redis.set(key, uuid.uuid4().hex, nx=True, px=SUBMITTER_LEASE_MS))


def run_submission(client: Client, info: BatchInfo) -> None:
    """Submit (the rest of) a ``validating`` batch's lines from its recorded input file; take
    :func:`claim_submission` first, so that one process does it."""
    source = InputFile(Path(info.input_path), info.input_file_id, 0, 0)
    _Submission(client, info, source, None).run()


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

    def renew(self) -> None:
        """Say that this batch's submission is alive (a driver resumes it otherwise)."""
        key = batch_submitter_key(self.info.id)
        self.client.redis.set(key, "submitting", px=SUBMITTER_LEASE_MS)

    def run(self) -> None:
        endpoint = self.info.endpoint or None
        lines = read_lines(lines_of(self.source.path), self.client.settings, self.served, endpoint)
        chunk: list[Line | Rejected] = []
        try:
            self.renew()
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
        self.renew()
        accepted = [item for item in chunk if isinstance(item, Line)]
        known = self.records.submitted(self.info.id, [line.custom_id for line in accepted])
        already = {line.custom_id for line, was in zip(accepted, known, strict=True) if was}
        for item in chunk:
            if isinstance(item, Rejected):
                self._reject(item)
            elif self.info.models and item.model not in self.info.models:
                self._reject(
                    Rejected(
                        item.number,
                        item.custom_id,
                        "model_not_allowed",
                        f"line {item.number}: this batch's key may not use the model "
                        f"{item.model!r}; ask for a key that allows it",
                    )
                )
            elif item.custom_id not in already and not self._submit_line(item):
                return False
            if self.on_line is not None:
                self.on_line(item.number)
        if time.monotonic() - self._collected_at > COLLECT_EVERY_S:
            self.batch.status()  # write what finished meanwhile
            self._collected_at = time.monotonic()
        return True

    def _reject(self, rejected: Rejected) -> None:
        text = output_lines.dumps(output_lines.rejected(self.info.id, rejected))
        self.records.reject(self.info.id, rejected.entry, text)

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
                self.renew()
            except PermanentError as exc:  # refused at the door: a bad body, an unserved model
                self._reject(
                    Rejected(
                        line.number,
                        line.custom_id,
                        snake_case(type(exc).__name__),
                        f"line {line.number}: {exc.message}",
                    )
                )
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


class Driver:
    """Moves every unfinished batch on without anyone asking: writes outcomes, expires and
    finalizes batches (which enqueues their webhooks), and resumes a submission whose
    submitter went away. The gateway runs one in a thread; any number may run at once, since
    each step holds the batch's writer lock and each resume the submitter's lease.

    A submission is resumed only from an input under ``CORRAL_BATCH_DIR/files/``: uploads and
    spooled lines, which never change; a user's own file may have. A batch whose output is in
    files under another ``CORRAL_BATCH_DIR`` is left to the processes that share that folder.
    """

    def __init__(self, client: Client, every_s: float = DRIVE_EVERY_S) -> None:
        self.client = client
        self.every_s = every_s
        self._handles: dict[str, Batch] = {}
        self._submitting: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = str(client.settings.batch_dir.expanduser().resolve())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="batch-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.step()
            except (redis.RedisError, CorralError, OSError) as exc:
                log.warning("batch driver: %s; trying again", exc)

    def submit(self, info: BatchInfo) -> None:
        """Submit a new batch's lines in the background (its lease is taken here)."""
        if claim_submission(self.client, info.id):
            self._run_submission(info)

    def step(self) -> None:
        """One pass over the unfinished batches."""
        active = {text(i) for i in self.client.redis.zrange(BATCHES_ACTIVE_KEY, 0, -1)}
        for batch_id in list(self._handles):
            if batch_id not in active:
                self._handles.pop(batch_id).close()
        for batch_id in sorted(active):
            try:
                info = load(self.client.redis, batch_id)
            except TaskNotFound:
                self.client.redis.zrem(BATCHES_ACTIVE_KEY, batch_id)
                continue
            if info.store == STORE_FILE and info.root != self._root:
                continue  # its files are on another disk: a process that shares it moves it on
            if info.status == VALIDATING and info.stop is None and self._resumable(info):
                self._run_submission(info)
            handle = self._handles.setdefault(batch_id, Batch(self.client, batch_id))
            if handle.status().ended:
                self.client.redis.zrem(BATCHES_ACTIVE_KEY, batch_id)
                self._handles.pop(batch_id).close()

    def _resumable(self, info: BatchInfo) -> bool:
        thread = self._submitting.get(info.id)
        if thread is not None and thread.is_alive():
            return False
        files = Path(self._root) / "files"
        path = Path(info.input_path)
        if not path.is_relative_to(files) or not path.is_file():
            return False
        return claim_submission(self.client, info.id)

    def _run_submission(self, info: BatchInfo) -> None:
        def run() -> None:
            try:
                run_submission(self.client, info)
            except (redis.RedisError, CorralError, OSError) as exc:
                log.warning("batch %s: submission stopped (%s); it resumes later", info.id, exc)

        thread = threading.Thread(target=run, name=f"submit-{info.id}", daemon=True)
        self._submitting[info.id] = thread
        thread.start()
