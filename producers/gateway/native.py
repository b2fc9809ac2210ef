"""The native task API (``/v1``): submit, read, follow (SSE) and cancel tasks; see the queues."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Path, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.responses import JSONResponse, Response

from producers.gateway.deps import Key, gateway_of
from producers.gateway.relay import follow
from producers.gateway.service import Gateway, Submitted
from producers.gateway.sse import (
    SSE,
    SSE_HEADERS,
    SSE_PING,
    DisconnectAwareStream,
    sse_event,
    sse_warning,
)
from producers.unserved import UnservedWatch, unserved_notice
from tasks.errors import InvalidRequest, TaskCancelled
from tasks.kinds import registry
from tasks.kinds.base import TaskKind
from tasks.queues import host_overview, queue_overview
from tasks.untrusted import nesting_error, parse_json

TASK_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TaskId = Annotated[str, Path(pattern=TASK_ID)]
After = Annotated[int | None, Query(ge=-1, description="Resume after this seq.")]
LastEventId = Annotated[
    int | None, Header(alias="Last-Event-ID", ge=-1, description="Resume after this seq.")
]


UNSERVED_WARNING = (
    "Present while the task waits in a queue no live worker serves: it stays queued until one does."
)

PRIORITY_NOTE = (
    " Next to the payload, the body may carry `priority`: 0-9, higher starts "
    "sooner (default 5), capped by the API key's max priority."
)


class TaskAccepted(BaseModel):
    id: str
    kind: str
    model: str
    queue: str
    position: int = Field(
        description="Tasks of the model that start before this one as the "
        "scheduler stood when it was admitted (0: it is next)."
    )
    status_url: str
    events_url: str
    warning: str | None = Field(default=None, description=UNSERVED_WARNING)


class TaskView(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    kind: str | None = None
    model: str | None = None
    queue: str | None = None
    position: int | None = Field(
        default=None,
        description="While queued: tasks of the model that start before this one (0: it is next)",
    )
    eta_s: float | None = Field(
        default=None,
        description="While queued: about how many seconds until it starts, from the model's "
        "measured service rate (absent until a run time was measured)",
    )
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    warning: str | None = Field(default=None, description=UNSERVED_WARNING)


class CancelView(BaseModel):
    id: str
    state: str = Field(
        description="cancelled (it will never run), running (it stops within "
        "one chunk) or the state it had already ended in"
    )
    ended: bool = Field(description="The task had already ended: nothing changed.")
    detail: str


CANCEL_DETAILS = {
    "cancelled": "cancelled; it never runs",
    "running": "cancel requested; the worker stops within one chunk",
}


class QueueView(BaseModel):
    model: str
    queue: str
    waiting: int = Field(description="The whole backlog: in the Celery queue plus pending")
    workers: int
    slots: int
    pending: int = Field(description="Of waiting, held by the scheduler until a slot frees")
    by_priority: dict[int, int] = Field(description="Pending tasks per aged priority (0-9)")
    oldest_wait_s: float = Field(description="How long the oldest pending task has waited")
    running: int


class WorkerView(BaseModel):
    node: str
    queues: list[str]
    slots: int
    ollama_host: str


class HostView(BaseModel):
    host: str
    model: str | None = Field(description="The model the scheduler keeps the host on")
    since: float | None = Field(description="Since when (Unix time)")
    switches: int = Field(description="Model switches (loads) the scheduler caused")


class QueuesView(BaseModel):
    queues: list[QueueView] = Field(
        description="Queues with waiting tasks or a live worker "
        "(an empty queue nobody serves is left out)"
    )
    workers: list[WorkerView]
    hosts: list[HostView] = Field(description="Ollama hosts and what each serves")


class ErrorBody(BaseModel):
    error: dict[str, Any]


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 429, 503)
}


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["tasks"], responses=ERRORS)

    def add_submit_route(kind: TaskKind[Any, Any]) -> None:
        schema_ref = {"$ref": f"#/components/schemas/{kind.payload.__name__}"}

        async def submit(request: Request, key: Key) -> Response:
            gw = gateway_of(request)
            data = await read_submission(request, gw)
            # Not the payload's: where the task goes in its model's order (capped per key).
            priority = data.pop("priority", None)
            callback_url = data.pop("callback_url", None)  # the webhook's
            submitted = await gw.submit(
                kind.name, data, key, priority=priority, callback_url=callback_url
            )
            warning = await run_in_threadpool(unserved_notice, gw.client.redis, submitted.job.id)
            return accepted(request, submitted, warning)

        router.add_api_route(
            f"/tasks/{kind.name}",
            submit,
            methods=["POST"],
            status_code=202,
            response_model=TaskAccepted,
            name=f"submit_{kind.name}",
            summary=f"Submit a {kind.name} task",
            description=kind.summary + PRIORITY_NOTE,
            openapi_extra={
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": schema_ref},
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "model": {"type": "string"},
                                    "prompt": {"type": "string"},
                                    "images": {
                                        "type": "array",
                                        "items": {"type": "string", "format": "binary"},
                                    },
                                },
                                "required": ["model"],
                            }
                        },
                    },
                }
            },
        )

    for kind in registry:
        add_submit_route(kind)

    @router.get("/tasks/{task_id}", response_model=TaskView, summary="A task's status and outcome")
    async def task_status(
        request: Request,
        task_id: TaskId,
        key: Key,
    ) -> Response:
        gw = gateway_of(request)
        job = await gw.require_task(task_id, key)
        record = await run_in_threadpool(job.record)
        outcome = await gw.outcome(job)
        view = TaskView(
            id=task_id,
            status=await run_in_threadpool(job.status),
            kind=record.get("kind"),
            model=record.get("model"),
            queue=record.get("queue"),
        )
        if outcome is not None:
            if outcome["type"] == "done":
                view.result = outcome["result"]
            elif outcome["type"] == "error":
                view.error = outcome["error"]
            else:
                view.error = TaskCancelled(
                    outcome.get("reason", "cancelled"), task_id=task_id
                ).to_dict()
        if view.status == "queued":
            view.warning = await run_in_threadpool(unserved_notice, gw.client.redis, task_id)
            if (place := await gw.waits.wait(task_id)) is not None:
                view.position, view.eta_s = place.position, place.eta_s
        return JSONResponse(
            view.model_dump(mode="json", exclude_none=True),
            headers=task_headers(task_id, view.position or 0),
        )

    @router.get(
        "/tasks/{task_id}/events",
        summary="The task's events as Server-Sent Events (resume with Last-Event-ID)",
        response_class=Response,
        responses={
            200: {
                "content": {SSE: {"schema": {"type": "string"}}},
                "description": "One SSE event per stream event; id is its seq.",
            }
        },
    )
    async def task_events(
        request: Request,
        task_id: TaskId,
        key: Key,
        after: After = None,
        last_event_id: LastEventId = None,
    ) -> Response:
        gw = gateway_of(request)
        after_seq = after if after is not None else -1
        if last_event_id is not None:
            after_seq = last_event_id
        job = await gw.require_task(task_id, key)
        watch = UnservedWatch(gw.client.redis, job.id)

        async def unserved() -> str | None:
            return await run_in_threadpool(watch.check) if watch.due() else None

        stream = follow(
            gw.redis,
            job.id,
            after_seq=after_seq,
            on_idle=lambda: gw.outcome(job),
            ping_every_s=gw.config.sse_ping_s,
            notice=unserved,
            waiting=lambda: gw.waits.wait(job.id),
        )

        async def body() -> AsyncIterator[bytes]:
            try:
                async for event in stream:
                    if event is None:
                        yield SSE_PING
                        continue
                    if event["type"] == "warning":
                        yield sse_warning(event)
                        continue
                    yield sse_event(event)
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

        return DisconnectAwareStream(
            body(), media_type=SSE, headers={**SSE_HEADERS, **task_headers(task_id)}
        )

    @router.delete("/tasks/{task_id}", response_model=CancelView, summary="Cancel a task")
    async def cancel_task(
        request: Request,
        task_id: TaskId,
        key: Key,
    ) -> Response:
        gw = gateway_of(request)
        job = await gw.require_task(task_id, key)
        state = await run_in_threadpool(job.cancel)
        detail = f"already {state}; nothing to cancel" if state.ended else CANCEL_DETAILS[state]
        view = CancelView(id=task_id, state=state, ended=state.ended, detail=detail)
        return JSONResponse(view.model_dump(), headers=task_headers(task_id))

    @router.get("/queues", response_model=QueuesView, summary="Depth per model, workers online")
    async def queues(request: Request, key: Key) -> QueuesView:
        gw = gateway_of(request)
        workers = await gw.workers()
        rows = await run_in_threadpool(queue_overview, gw.client.redis, workers, gw.settings)
        hosts = sorted({w.ollama_host for w in workers})
        loads = await run_in_threadpool(host_overview, gw.client.redis, gw.settings, hosts)
        return QueuesView(
            queues=[
                QueueView(**asdict(row)) for row in rows if key is None or key.allows(row.model)
            ],
            workers=[
                WorkerView(node=w.node, queues=w.queues, slots=w.slots, ollama_host=w.ollama_host)
                for w in workers
            ],
            hosts=[HostView(**asdict(h)) for h in loads],
        )

    return router


def task_headers(task_id: str, position: int = 0) -> dict[str, str]:
    return {"X-Corral-Task-Id": task_id, "X-Corral-Queue-Position": str(position)}


def accepted(request: Request, submitted: Submitted, warning: str | None = None) -> Response:
    task_id = submitted.job.id
    view = TaskAccepted(
        id=task_id,
        kind=submitted.kind,
        model=submitted.model,
        queue=submitted.queue,
        position=submitted.position,
        status_url=str(request.url_for("task_status", task_id=task_id)),
        events_url=str(request.url_for("task_events", task_id=task_id)),
        warning=warning,
    )
    return JSONResponse(
        view.model_dump(exclude_none=True), status_code=202, headers=submitted.headers
    )


async def read_submission(request: Request, gw: Gateway) -> dict[str, Any]:
    """The payload from JSON, or from ``multipart/form-data`` (image files under ``images``)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_form(request, gw)
    raw = await request.body()
    limit = gw.settings.max_json_depth
    data = parse_json(raw, what="the body", max_depth=limit) if raw else None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object (the task's payload)")
    return data


TEXT_FIELDS = ("model", "prompt", "system")


async def _read_form(request: Request, gw: Gateway) -> dict[str, Any]:
    limit = gw.settings.max_image_bytes
    try:
        form = await request.form(max_files=gw.settings.max_images, max_fields=64)
    except Exception as exc:  # starlette raises several types for a malformed form
        raise InvalidRequest(f"cannot read the form: {exc}") from exc
    data: dict[str, Any] = {}
    images: list[bytes | str] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name != "images":
                    raise InvalidRequest(
                        f"unexpected file field {name!r}; send images as 'images'", field=name
                    )
                content = await value.read(limit + 1)
                if len(content) > limit:
                    raise InvalidRequest(
                        f"images[{len(images)}]: larger than {limit:,} bytes", field="images"
                    )
                images.append(content)
            elif name == "images":
                images.append(value)  # base64 text in a plain field
            elif name in TEXT_FIELDS:
                data[name] = value
            else:
                try:
                    data[name] = json.loads(value)  # options, messages, schema, think...
                except ValueError:
                    data[name] = value  # e.g. format=json, keep_alive=5m
                except RecursionError as exc:
                    raise nesting_error(name, gw.settings.max_json_depth, name) from exc
    finally:
        await form.close()
    if images:
        data["images"] = images
    return data
