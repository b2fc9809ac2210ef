"""The Redis vocabulary of ollama-corral: queue names and every key and channel builder.

Producers, workers and the exporter import these; no other module spells a key.
"""

from __future__ import annotations

import re

from tasks.errors import InvalidRequest

PREFIX = "corral"
QUEUE_PREFIX = f"{PREFIX}."
# set: models ever submitted or served (canonical names), and those whose queue was declared by
# hand (found by tasks.queues.index_existing): the index of the model queues, so that finding
# them never scans a keyspace that holds a record per task.
MODELS_KEY = f"{PREFIX}:models"
# zset: worker node → when it last announced; the index of the worker_key() announcements, so
# that finding the workers never scans a keyspace that holds a record per task.
WORKERS_KEY = f"{PREFIX}:workers"
DLQ_KEY = f"{PREFIX}:dlq"  # hash: task id → dead-letter record
# Messages pushed to a task queue and not yet recorded as taken (see tasks/broker.py):
LEDGER_KEY = f"{PREFIX}:ledger"  # hash: delivery tag → [queue key, message, requeues]
LEDGER_INDEX_KEY = f"{PREFIX}:ledger:index"  # zset: delivery tag → when last seen
LEDGER_SUSPECTS_KEY = f"{PREFIX}:ledger:missing"  # hash: delivery tag → first seen missing
LEDGER_STATS_KEY = f"{PREFIX}:ledger:stats"  # hash: requeued → messages the sweep recovered
API_KEYS_KEY = f"{PREFIX}:apikeys"  # hash: gateway API key id → SHA-256 of the whole key

# The webhook outbox (tasks/webhooks/outbox.py): a delivery's record, due and dead indexes.
WEBHOOK_DUE_KEY = f"{PREFIX}:webhooks:due"  # zset: webhook id → when its next attempt is due
WEBHOOK_DEAD_KEY = f"{PREFIX}:webhooks:dead"  # zset: webhook id → when it was given up

# kombu's Redis transport: delivered-but-unacknowledged messages, their delivery times, the
# lock of the sweep that restores them (its defaults), and the priority sub-lists a queue is
# split into (name, name\x06\x163, ...). Corral orders work in its scheduler, so the transport
# keeps one step (celery_config): a queue is one list, a worker blocks on one list per queue,
# and a message sent with a Celery priority lands on that list too. Earlier versions kept
# kombu's default steps; a worker moves what is left in those sub-lists onto its queues
# (tasks.broker.adopt_old_priority_lists).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
KOMBU_UNACKED_MUTEX = "unacked_mutex"
KOMBU_BINDING_PREFIX = "_kombu.binding."
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0,)
OLD_PRIORITY_STEPS = (3, 6, 9)  # kombu's default steps beside 0, kept by earlier versions


def priority_list(queue: str, step: int) -> str:
    """The Redis list kombu keeps a queue's messages of priority ``step`` in."""
    return queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"


def old_priority_lists(queue: str) -> list[str]:
    """The sub-lists earlier versions may have left messages of ``queue`` in."""
    return [priority_list(queue, step) for step in OLD_PRIORITY_STEPS]


# name[:tag], optionally behind a registry host and namespace, as Ollama accepts them.
_PART = r"[a-z0-9][a-z0-9._-]*"
_MODEL_RE = re.compile(rf"^(?:{_PART}(?::\d+)?/)?(?:{_PART}/)?{_PART}(?::[a-z0-9_][a-z0-9._-]*)?$")
MAX_MODEL_NAME = 200


def canonical_model(name: str) -> str:
    """``llama3.2`` → ``llama3.2:latest``; names are lower-cased and checked against the grammar."""
    cleaned = name.strip().lower() if isinstance(name, str) else ""
    if not cleaned or len(cleaned) > MAX_MODEL_NAME or not _MODEL_RE.match(cleaned):
        raise InvalidRequest(
            f"invalid model name {name!r}: expected name[:tag] such as 'llama3.2' or 'llava:7b'",
            field="model",
        )
    last = cleaned.rsplit("/", 1)[-1]
    return cleaned if ":" in last else f"{cleaned}:latest"


def task_name(kind: str) -> str:
    """The Celery task that runs tasks of ``kind`` (the kinds are listed in tasks/kinds/)."""
    return f"{PREFIX}.{kind}"


def queue_name(model: str) -> str:
    """The Celery queue that carries every task for ``model``."""
    return QUEUE_PREFIX + canonical_model(model)


def model_of_queue(queue: str) -> str:
    return queue.removeprefix(QUEUE_PREFIX)


def stream_channel(task_id: str) -> str:
    """Pub/sub channel with the task's live events."""
    return f"{PREFIX}:stream:{task_id}"


def log_key(task_id: str) -> str:
    """Capped Redis stream replaying the task's events to late subscribers."""
    return f"{PREFIX}:log:{task_id}"


def task_key(task_id: str) -> str:
    """Submission record: proves the task exists even while Celery still says PENDING."""
    return f"{PREFIX}:task:{task_id}"


def cancel_key(task_id: str) -> str:
    """Present while a cancellation was requested."""
    return f"{PREFIX}:cancel:{task_id}"


def lease_key(task_id: str) -> str:
    """Held by the worker running the task, renewed by its heartbeat."""
    return f"{PREFIX}:lease:{task_id}"


def idempotency_key(key: str) -> str:
    """Maps a producer's idempotency key to the first task submitted with it."""
    return f"{PREFIX}:idem:{key}"


def worker_key(node: str) -> str:
    """A worker's announcement: queues, slots, Ollama host (expires unless renewed)."""
    return f"{PREFIX}:worker:{node}"


def webhook_key(webhook_id: str) -> str:
    """Hash: one webhook delivery (url, body, attempts, last error) until it is delivered."""
    return f"{PREFIX}:webhook:{webhook_id}"


def blob_key(digest: str) -> str:
    """An image sent by reference, keyed by its sha256."""
    return f"{PREFIX}:blob:{digest}"


def api_key_key(digest: str) -> str:
    """A gateway API key's record, keyed by the SHA-256 of the whole key."""
    return f"{PREFIX}:apikey:{digest}"


def rate_key(key_id: str, minute: int) -> str:
    """Requests an API key made in one minute (since the epoch)."""
    return f"{PREFIX}:gw:rate:{key_id}:{minute}"


def in_flight_key(key_id: str) -> str:
    """Zset: an API key's unfinished task ids → when submitted."""
    return f"{PREFIX}:gw:inflight:{key_id}"


# The scheduler's pending work (tasks/scheduler/, docs/scheduling.md). Per-model structures are
# built in its Lua scripts from these templates, so each name is still spelled here only.
SCHED_PREFIX = f"{PREFIX}:sched"
SCHED_TASKS_KEY = f"{SCHED_PREFIX}:tasks"  # hash: task id → {model, tenant, delivery tag, state}
SCHED_MESSAGES_KEY = f"{SCHED_PREFIX}:messages"  # hash: task id → ledger entry, until released
SCHED_BOUNDS_KEY = f"{SCHED_PREFIX}:bounds"  # hash: model → depth bound (overrides the setting)
SCHED_WEIGHTS_KEY = f"{SCHED_PREFIX}:weights"  # hash: tenant → fair-share weight (default 1)
SCHED_MODELS_KEY = f"{SCHED_PREFIX}:models"  # set: models that ever had pending work
SCHED_HOSTS_KEY = f"{SCHED_PREFIX}:hosts"  # set: the hosts with a sched_host_key() hash (index)
# set: the models with pending work (a non-empty sched_waiting_key()), kept by every step that
# adds to or takes from those zsets: a release visits these, not every model a host serves
SCHED_BACKLOGGED_KEY = f"{SCHED_PREFIX}:backlogged"
# hash: "<band>:<bucket>" → tasks that started after a wait in that bucket (its index in
# tasks.scheduler.lua.WAIT_BUCKETS_S, or "inf"); "<band>:sum" → their summed waits in seconds
SCHED_WAITS_KEY = f"{SCHED_PREFIX}:waits"
# Admission asks whether anyone serves a model (tasks/scheduler/served.py):
SCHED_SERVED_KEY = f"{SCHED_PREFIX}:served"  # zset: model → when a live worker last announced it
SCHED_OFFERED_KEY = f"{SCHED_PREFIX}:offered"  # zset: model → when a host's /api/tags last had it


def sched_waiting_key(model: str) -> str:
    """Zset of the model's pending tasks by submission time: depth and oldest wait."""
    return f"{SCHED_PREFIX}:{model}:waiting"


def sched_tenants_key(model: str) -> str:
    """Set of the tenants with pending tasks for the model."""
    return f"{SCHED_PREFIX}:{model}:tenants"


def sched_tenant_key(model: str, tenant: str) -> str:
    """Zset of one tenant's pending tasks for the model, by submitted_at - priority × aging."""
    return f"{SCHED_PREFIX}:{model}:tenant:{tenant}"


def sched_fair_key(model: str) -> str:
    """Hash: tenant → its virtual time on the model, as "base releases weight"."""
    return f"{SCHED_PREFIX}:{model}:fair"


def sched_state_key(model: str) -> str:
    """Hash: the model's virtual time, release sequence and mean run time (service_s)."""
    return f"{SCHED_PREFIX}:{model}:state"


def sched_released_key(model: str) -> str:
    """Zset of tasks pushed to the Celery queue and not yet started, in release order."""
    return f"{SCHED_PREFIX}:{model}:released"


def sched_running_key(model: str) -> str:
    """Zset of started tasks not yet finished, by start time."""
    return f"{SCHED_PREFIX}:{model}:running"


def sched_host_key(host: str) -> str:
    """Hash of an Ollama host: the model it took last and since when, model switches so far,
    and how many models it keeps loaded at once (resident)."""
    return f"{SCHED_PREFIX}:host:{host}"


def sched_host_models_key(host: str) -> str:
    """Zset of the models an Ollama host keeps loaded, as the scheduler sees it → since when.

    Not under ``sched_host_key``: the index of the hosts is rebuilt by scanning that pattern."""
    return f"{SCHED_PREFIX}:loaded:{host}"


def sched_host_busy_key(host: str, model: str) -> str:
    """Zset of the model's tasks released for or running on the host → when."""
    return f"{SCHED_PREFIX}:busy:{host}:{model}"


def sched_host_active_key(host: str) -> str:
    """Set of the models with a non-empty ``sched_host_busy_key`` on the host (its index)."""
    return f"{SCHED_PREFIX}:active:{host}"


# Batches (tasks/batches/, docs/batches.md): one record per batch and a few structures beside it.
def batch_key(batch_id: str) -> str:
    """Hash: the batch's record (status, owner, options) and its counters."""
    return f"{PREFIX}:batch:{batch_id}"


def batch_lines_key(batch_id: str) -> str:
    """Hash: custom_id → task id, for every line submitted as a task."""
    return f"{PREFIX}:batch:{batch_id}:lines"


def batch_open_key(batch_id: str) -> str:
    """Hash: task id → its line (custom_id, url, model), until its outcome is written."""
    return f"{PREFIX}:batch:{batch_id}:open"


def batch_done_key(batch_id: str) -> str:
    """Set: the output entries already written (the collector's idempotency record)."""
    return f"{PREFIX}:batch:{batch_id}:done"


def batch_output_key(batch_id: str) -> str:
    """Hash: custom_id → output line, for a batch whose output is kept in Redis."""
    return f"{PREFIX}:batch:{batch_id}:output"


def batch_errors_key(batch_id: str) -> str:
    """Hash: custom_id → error line of a failed task, for a batch whose output is in Redis."""
    return f"{PREFIX}:batch:{batch_id}:errors"


def batch_rejected_key(batch_id: str) -> str:
    """Hash: entry → error line of a line refused as it was read (always in Redis)."""
    return f"{PREFIX}:batch:{batch_id}:rejected"


def batch_writer_key(batch_id: str) -> str:
    """The lock of the one process that writes the batch's outcomes at a time."""
    return f"{PREFIX}:batch:{batch_id}:writer"


def batches_key(owner: str) -> str:
    """Zset: an owner's batch ids → when created (listing, newest first)."""
    return f"{PREFIX}:batches:{owner}"


def batch_submitter_key(batch_id: str) -> str:
    """The lease of the process submitting a batch's lines (renewed as it reads): without
    it, a batch still ``validating`` lost its submitter and may be resumed."""
    return f"{PREFIX}:batch:{batch_id}:submitter"


BATCHES_ACTIVE_KEY = f"{PREFIX}:batches-active"  # zset: unfinished batch ids → when created


# Uploaded files (the gateway's /v1/files, docs/batches.md): a record each, the bytes on disk.
def file_key(file_id: str) -> str:
    """Hash: an uploaded file's record (owner, filename, bytes, purpose, created_at, lines)."""
    return f"{PREFIX}:file:{file_id}"


def files_key(owner: str) -> str:
    """Zset: an owner's uploaded file ids → when uploaded."""
    return f"{PREFIX}:files:{owner}"
