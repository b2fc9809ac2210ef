"""What the routes share: the SDK client, async Redis, limits, and the submit path.

The SDK is synchronous (redis-py, Celery's producer), so its calls run in the threadpool; the
event relay and the limit counters use ``redis.asyncio`` directly.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from producers.batches import Driver
from producers.client import Client
from producers.gateway.auth import ApiKey
from producers.gateway.config import GatewayConfig
from producers.gateway.limits import Admission, Refusal, admit, withdraw
from producers.gateway.upstream import make_http_client
from producers.images import prepare_images
from producers.jobs import Job
from tasks.errors import CorralError, InvalidRequest, TaskCancelled, TaskNotFound
from tasks.images import decode_base64_image
from tasks.keys import queue_name, task_key
from tasks.payloads import validate_payload
from tasks.registry import WorkerInfo, live_workers
from tasks.scheduler import DEFAULT_PRIORITY, check_priority, check_tenant
from tasks.scheduler.views import AsyncWaitReader
from tasks.settings import Settings

OWNER_FIELD = "owner"  # in the task record: the id of the API key that submitted it
RECENT_WORKERS_S = 1.0  # workers announce every 5 s; a second-old list is fresh enough


@dataclass(frozen=True)
class Submitted:
    job: Job
    kind: str
    model: str
    queue: str
    position: int

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Corral-Task-Id": self.job.id, "X-Corral-Queue-Position": str(self.position)}


class Gateway:
    """One per app: built in the lifespan, closed with it."""

    def __init__(self, settings: Settings, config: GatewayConfig, *, require_auth: bool) -> None:
        self.settings = settings
        self.config = config
        self.require_auth = require_auth
        self.client = Client(settings=settings)
        self.redis = aioredis.Redis.from_url(settings.redis_url, health_check_interval=10)
        self.http = make_http_client(settings, config.upstream_timeout_s)
        self._workers: list[WorkerInfo] = []
        self._workers_at = -math.inf
        self.waits = AsyncWaitReader(self.redis, settings, self.recent_workers)
        self.batches = Driver(self.client)  # moves batches on (docs/batches.md)
        self.batches.start()

    async def close(self) -> None:
        await run_in_threadpool(self.batches.stop)
        await self.redis.aclose()
        await self.http.aclose()
        await run_in_threadpool(self.client.close)

    # -- submission ---------------------------------------------------------------------
    async def submit(
        self,
        kind: str,
        data: dict[str, Any],
        key: ApiKey | None,
        *,
        priority: int | None = None,
        callback_url: Any = None,
        user: str | None = None,
    ) -> Submitted:
        """Validate, check the key's models and in-flight limit, then admit (the scheduler
        bounds the queue: QueueFull; and refuses models nobody serves: ModelNotFound).

        The key is the task's tenant (:func:`_order`: OpenAI's ``user`` may name one), and caps
        ``priority`` (default 5). ``callback_url``: README, "Webhooks"."""
        clean = await run_in_threadpool(self._prepare, kind, data)
        model = str(clean["model"])
        if key is not None and not key.allows(model):
            raise Refusal(403, "ModelNotAllowed", f"this key may not use model {model!r}")
        order = _order(key, priority, user)
        queue = queue_name(model)
        task_id = str(uuid.uuid4())
        admission = await admit(
            self.redis,
            task_id,
            key,
            default_in_flight=self.config.max_in_flight,
            in_flight_ttl_s=self.settings.task_deadline_s,
        )
        if admission.verdict != "admitted":
            raise self._refusal(admission, key)
        try:
            job = await run_in_threadpool(
                partial(
                    self.client.submit,
                    kind,
                    clean,
                    task_id=task_id,
                    callback_url=callback_url,
                    **order,
                )
            )
        except Exception:
            await withdraw(self.redis, task_id, key)
            raise
        if key is not None:
            # Nobody else knows the id before the 202 goes out, so marking it now is in time.
            await self.redis.hset(task_key(job.id), OWNER_FIELD, key.id)
        place = await self.waits.wait(job.id)
        return Submitted(job, kind, model, queue, place.position if place else 0)

    def _prepare(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Images to checked parts, then validate (large images are stored on submission)."""
        data = {k: v for k, v in data.items() if v is not None}
        if isinstance(data.get("images"), list):
            data["images"] = self._images(data["images"], "images")
        messages = data.get("messages")
        if isinstance(messages, list):
            data["messages"] = [
                {**m, "images": self._images(m["images"], f"messages[{i}].images")}
                if isinstance(m, dict) and isinstance(m.get("images"), list)
                else m
                for i, m in enumerate(messages)
            ]
        payload = validate_payload(kind, data, self.settings)
        return {**data, "model": payload.model}

    def _images(self, images: list[Any], field: str) -> list[dict[str, Any]]:
        # Only base64 text is taken from the network: a path would read the gateway's own disk.
        raw = []
        for index, image in enumerate(images):
            where = f"{field}[{index}]"
            if isinstance(image, bytes):  # a multipart upload
                raw.append(image)
            elif isinstance(image, str):
                raw.append(decode_base64_image(image, field=where))
            else:
                raise InvalidRequest(f"{where}: expected base64 text", field=where)
        if len(raw) > self.settings.max_images:
            raise InvalidRequest(
                f"{field}: at most {self.settings.max_images} images are allowed, got {len(raw)}",
                field=field,
            )
        return prepare_images(raw, self.settings, field)  # stored by submit(), once validated

    def _refusal(self, admission: Admission, key: ApiKey | None) -> Refusal:
        owner = f"key {key.id}" if key is not None else "this key"
        return Refusal(
            429,
            "TooManyInFlight",
            f"{owner} already has {admission.count} unfinished tasks; wait for one to end",
            1,
        )

    # -- reading ------------------------------------------------------------------------
    def job(self, task_id: str) -> Job:
        return self.client.job(task_id)

    async def require_task(self, task_id: str, key: ApiKey | None) -> Job:
        """The task, if it exists and ``key`` may see it: with keys, only the key that
        submitted it may. Anything else is a 404, so that task ids leak nothing."""
        job = self.job(task_id)
        record = await run_in_threadpool(job.record)
        missing = TaskNotFound(
            f"no task {task_id} was submitted (or its records expired)", task_id=task_id
        )
        if key is not None and record.get(OWNER_FIELD) != key.id:
            raise missing
        if not record and await run_in_threadpool(_status_or_none, job) is None:
            raise missing
        return job

    async def workers(self) -> list[WorkerInfo]:
        return await run_in_threadpool(live_workers, self.client.redis)

    async def recent_workers(self) -> list[WorkerInfo]:
        """:meth:`workers`, at most ``RECENT_WORKERS_S`` old: the facade asks on every request."""
        now = time.monotonic()
        if now - self._workers_at > RECENT_WORKERS_S:
            self._workers = await self.workers()
            self._workers_at = now
        return self._workers

    async def outcome(self, job: Job) -> dict[str, Any] | None:
        """The stored outcome as a terminal event, once the task has ended (else None)."""
        status = await run_in_threadpool(_status_or_none, job)
        if status not in ("succeeded", "failed", "cancelled"):
            return None
        try:
            result = await run_in_threadpool(job.result, 5.0)
        except TaskCancelled as exc:
            return {"type": "cancelled", "reason": exc.message}
        except CorralError as exc:
            return {"type": "error", "error": exc.to_dict()}
        return {"type": "done", "result": result.model_dump(mode="json", exclude_none=True)}


def _order(key: ApiKey | None, priority: int | None, user: str | None = None) -> dict[str, Any]:
    """A task's place in the scheduler's order: its key is its tenant and caps its priority.

    OpenAI's ``user`` names the tenant where no key fixes one: on a gateway without keys it is
    the tenant, and a key made with ``user_tenants`` makes it a sub-tenant ``<key id>/<user>``;
    any other key keeps its own tenant. A ``user`` that names a tenant must be a tenant name.
    """
    if key is not None:
        order: dict[str, Any] = {"priority": key.priority(priority), "tenant": key.tenant}
        if user and key.user_tenants:
            order["tenant"] = _user_tenant(key.tenant_for(user))
        return order
    order = {"priority": DEFAULT_PRIORITY if priority is None else check_priority(priority)}
    if user:
        order["tenant"] = _user_tenant(user)
    return order


def _user_tenant(tenant: str) -> str:
    try:
        return check_tenant(tenant)
    except InvalidRequest as exc:
        raise InvalidRequest(
            f"invalid user {tenant.rpartition('/')[2]!r}: it names the task's tenant here, so "
            "it must be at most 128 letters, digits or . _ : @ / - (with the key's id), "
            "starting with a letter or digit; a hash of the user's id fits",
            field="user",
        ) from exc


def _status_or_none(job: Job) -> str | None:
    try:
        return job.status()
    except TaskNotFound:
        return None
