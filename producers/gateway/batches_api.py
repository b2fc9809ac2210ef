"""OpenAI's Batch API: ``/v1/files`` and ``/v1/batches``, over corral's batches.

A batch created here is the same batch the SDK and ``corral batch`` make (tasks/batches/,
producers/batches.py): its lines are submitted by a thread of the gateway's
:class:`producers.batches.Driver`, which also writes their outcomes, finalizes the batch and so
enqueues its webhook, and resumes a submission another gateway left unfinished. Files and
batches belong to the API key that made them; another key is answered 404.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from producers.batches import DEFAULT_OWNER, Batch, list_batches, plan_batch
from producers.gateway import files
from producers.gateway.auth import ApiKey
from producers.gateway.deps import Key, gateway_of
from producers.gateway.limits import Refusal
from producers.gateway.openai_api import OpenAIRoute, json_body
from producers.gateway.openai_replies import invalid_body
from producers.gateway.service import Gateway
from tasks.batches import DEFAULT_PRIORITY, URLS, BatchInfo, create, load
from tasks.batches.lines import TASKS_URL
from tasks.errors import InvalidRequest, TaskNotFound
from tasks.kinds import registry
from tasks.scheduler import check_priority

CALLBACK_FIELD = "callback_url"  # a field of the request, or a key of its metadata
WINDOW = re.compile(r"^(\d+)([hms])$")
UNITS = {"h": 3600, "m": 60, "s": 1}
MULTIPART_SLACK_BYTES = 64 * 1024  # boundaries and the purpose field, beside the file


class BatchRequest(BaseModel):
    """``POST /v1/batches``, as OpenAI takes it; ``callback_url`` and ``priority`` are corral's."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    callback_url: str | None = None
    priority: int | None = None


def owner_of(key: ApiKey | None) -> str:
    return key.id if key is not None else DEFAULT_OWNER


def batch_not_found(batch_id: str) -> Refusal:
    return Refusal(404, "BatchNotFound", f"No such Batch object: {batch_id}")


def window_s(value: str) -> float:
    found = WINDOW.match(value)
    if not found or int(found[1]) == 0:
        raise InvalidRequest(
            f"completion_window: {value!r} is not a duration like '24h' (or 90m, 600s)",
            field="completion_window",
        )
    return float(int(found[1]) * UNITS[found[2]])


def check_endpoint(endpoint: str) -> str:
    kinds = [TASKS_URL + name for name in registry.names()]
    if endpoint not in URLS and endpoint not in kinds:
        raise InvalidRequest(
            f"endpoint: {endpoint!r} is not one of {', '.join([*URLS, *kinds])}",
            field="endpoint",
        )
    return endpoint


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai batches"], route_class=OpenAIRoute)

    # -- files -------------------------------------------------------------------------------
    @router.post("/files", summary="Upload a batch's JSONL input (multipart, purpose=batch)")
    async def upload(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise InvalidRequest(
                "file: send a multipart/form-data body with the fields file and purpose",
                field="file",
            )
        limit = gw.settings.batch_file_max_bytes + MULTIPART_SLACK_BYTES
        parser = MultiPartParser(
            request.headers, files.limited(request.stream(), limit), max_files=1, max_fields=4
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise InvalidRequest(
                f"file: the body is not a multipart form ({exc.message}); send file and purpose",
                field="file",
            ) from exc
        try:
            purpose, part = form.get("purpose"), form.get("file")
            if purpose != files.PURPOSE:
                raise InvalidRequest(
                    f"purpose: {purpose!r} is not served; this gateway takes files for "
                    "purpose 'batch' only",
                    field="purpose",
                )
            if not isinstance(part, UploadFile):
                raise InvalidRequest("file: no file part in the form", field="file")
            if part.size is not None and part.size > gw.settings.batch_file_max_bytes:
                raise Refusal(
                    413,
                    "FileTooLarge",
                    f"the file is larger than {gw.settings.batch_file_max_bytes} bytes",
                )
            stored = await run_in_threadpool(
                files.store_upload,
                gw.client.redis,
                gw.settings.batch_dir,
                part.file,
                part.filename or "upload.jsonl",
                owner_of(key),
            )
        finally:
            await form.close()
        return JSONResponse(stored.to_openai())

    @router.get("/files", summary="The key's uploaded files, newest first")
    async def list_files(
        request: Request,
        key: Key,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        purpose: str | None = None,
    ) -> Response:
        gw = gateway_of(request)
        if purpose not in (None, files.PURPOSE):
            return JSONResponse(
                {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
            )
        found = await run_in_threadpool(
            files.list_uploads, gw.client.redis, owner_of(key), after, limit
        )
        return JSONResponse(found)

    @router.get("/files/{file_id}", summary="A file object: an upload, or a batch's output")
    async def retrieve_file(request: Request, key: Key, file_id: str) -> Response:
        gw, owner = gateway_of(request), owner_of(key)
        made = await run_in_threadpool(files.batch_file, gw.client.redis, file_id, owner)
        if made is not None:
            obj = await run_in_threadpool(files.batch_file_object, gw.client.redis, *made)
            return JSONResponse(obj)
        stored = await run_in_threadpool(files.uploaded, gw.client.redis, file_id, owner)
        return JSONResponse(stored.to_openai())

    @router.get("/files/{file_id}/content", summary="A file's bytes, streamed")
    async def file_content(request: Request, key: Key, file_id: str) -> Response:
        gw, owner = gateway_of(request), owner_of(key)
        made = await run_in_threadpool(files.batch_file, gw.client.redis, file_id, owner)
        if made is not None:
            lines = files.batch_lines(gw.client.redis, made[0], gw.settings.batch_dir, made[1])
            return StreamingResponse(
                iterate_in_threadpool(lines), media_type="application/octet-stream"
            )
        stored = await run_in_threadpool(files.uploaded, gw.client.redis, file_id, owner)
        return FileResponse(
            files.upload_path(gw.settings.batch_dir, stored.id),
            media_type="application/octet-stream",
        )

    @router.delete("/files/{file_id}", summary="Delete an upload")
    async def delete_file(request: Request, key: Key, file_id: str) -> Response:
        gw, owner = gateway_of(request), owner_of(key)
        if await run_in_threadpool(files.batch_file, gw.client.redis, file_id, owner):
            raise InvalidRequest(
                f"{file_id} is a batch's output: it lives as long as the batch "
                "(CORRAL_BATCH_TTL_S after it ends) and cannot be deleted",
                field="file_id",
            )
        settings = gw.settings
        await run_in_threadpool(
            files.delete_upload, gw.client.redis, settings.batch_dir, file_id, owner
        )
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- batches -----------------------------------------------------------------------------
    @router.post("/batches", summary="Run an uploaded JSONL file as a batch")
    async def create_batch(request: Request, key: Key) -> Response:
        gw = gateway_of(request)
        try:
            body = BatchRequest.model_validate(await json_body(request))
        except ValidationError as exc:
            return invalid_body(exc)
        info = await run_in_threadpool(_create, gw, key, body)
        return JSONResponse(info.to_openai())

    @router.get("/batches/{batch_id}", summary="A batch, in OpenAI's shape")
    async def retrieve_batch(request: Request, key: Key, batch_id: str) -> Response:
        info = await run_in_threadpool(_owned, gateway_of(request), key, batch_id)
        return JSONResponse(info.to_openai())

    @router.post("/batches/{batch_id}/cancel", summary="Cancel a batch; what finished is kept")
    async def cancel_batch(request: Request, key: Key, batch_id: str) -> Response:
        gw = gateway_of(request)
        await run_in_threadpool(_owned, gw, key, batch_id)
        info = await run_in_threadpool(_cancel, gw, batch_id)
        return JSONResponse(info.to_openai())

    @router.get("/batches", summary="The key's batches, newest first")
    async def list_all(
        request: Request,
        key: Key,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> Response:
        gw = gateway_of(request)
        found, more = await run_in_threadpool(
            lambda: list_batches(gw.client, owner_of(key), after=after, limit=limit)
        )
        data = [b.to_openai() for b in found]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            }
        )

    return router


def _create(gw: Gateway, key: ApiKey | None, body: BatchRequest) -> BatchInfo:
    """Record the batch and start submitting its lines; it answers ``validating`` at once."""
    owner = owner_of(key)
    stored = files.uploaded(gw.client.redis, body.input_file_id, owner)
    metadata = dict(body.metadata or {})
    callback = body.callback_url or metadata.get(CALLBACK_FIELD)
    wanted = DEFAULT_PRIORITY if body.priority is None else check_priority(body.priority)
    info = plan_batch(
        gw.client,
        stored.input_file(gw.settings.batch_dir),
        owner=owner,
        key=uuid.uuid4().hex,  # every create is a new batch, as in OpenAI's API
        priority=wanted if key is None else key.priority(wanted),
        tenant=key.tenant if key is not None else None,
        completion_window_s=window_s(body.completion_window),
        endpoint=check_endpoint(body.endpoint),
        metadata=metadata,
        callback_url=callback,
        models=key.models if key is not None else None,
    )
    create(gw.client.redis, info)
    gw.batches.submit(info)
    return info


def _owned(gw: Gateway, key: ApiKey | None, batch_id: str) -> BatchInfo:
    try:
        info = load(gw.client.redis, batch_id)
    except TaskNotFound:
        raise batch_not_found(batch_id) from None
    if info.owner != owner_of(key):
        raise batch_not_found(batch_id)
    return info


def _cancel(gw: Gateway, batch_id: str) -> BatchInfo:
    handle = Batch(gw.client, batch_id)
    try:
        return handle.cancel()
    finally:
        handle.close()


__all__ = ["build_router"]
