"""The gateway's file store (OpenAI's ``/v1/files``): batch inputs uploaded by API keys, and the
output and error files of their batches.

An upload is parsed as it arrives (the multipart parser spools a part past 1 MB to a temporary
file), then copied a megabyte at a time to ``CORRAL_BATCH_DIR/files/<file id>.jsonl`` while
its bytes and lines are counted, so a 200 MB file is never held in memory. Its record (owner,
name, size) is a hash in Redis (:func:`tasks.keys.file_key`). A batch's output and error files
are not copies: ``<batch id>-output`` and ``<batch id>-errors`` name the batch's own store,
read as it is served (docs/batches.md).
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from producers.gateway.limits import Refusal
from tasks.batches import ERRORS, OUTPUT, STORE_FILE, BatchInfo, load, read_output
from tasks.batches.files import CHUNK_BYTES, InputFile
from tasks.errors import InvalidRequest, TaskNotFound
from tasks.keys import (
    batch_errors_key,
    batch_key,
    batch_output_key,
    batch_rejected_key,
    file_key,
    files_key,
)

PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
SUFFIXES = {"-output": OUTPUT, "-errors": ERRORS}


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's record."""

    id: str
    owner: str
    filename: str
    bytes: int
    lines: int
    created_at: int
    purpose: str = PURPOSE

    def to_openai(self) -> dict[str, Any]:
        return file_object(self.id, self.bytes, self.created_at, self.filename, self.purpose)

    def input_file(self, root: Path) -> InputFile:
        return InputFile(upload_path(root, self.id), self.id, self.lines, self.bytes)


def file_object(
    file_id: str, size: int, created_at: int, filename: str, purpose: str
) -> dict[str, Any]:
    """OpenAI's ``file`` object."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def upload_path(root: Path, file_id: str) -> Path:
    return root.expanduser().resolve() / "files" / f"{file_id}.jsonl"


def not_found(file_id: str) -> Refusal:
    # Another key's file answers the same: ids reveal nothing.
    return Refusal(404, "FileNotFound", f"No such File object: {file_id}")


async def limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """The request body, refused (413) once it passes ``limit`` bytes, as it arrives."""
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise Refusal(
                413,
                "FileTooLarge",
                f"the upload is larger than {limit} bytes (CORRAL_BATCH_FILE_MAX_BYTES); "
                "split the batch into several files",
            )
        yield chunk


def store_upload(
    client: redis.Redis, root: Path, source: IO[bytes], filename: str, owner: str
) -> StoredFile:
    """Copy an uploaded part under ``root/files/`` a chunk at a time, then record it."""
    folder = root.expanduser() / "files"
    folder.mkdir(parents=True, exist_ok=True)
    file_id = f"file-{uuid.uuid4().hex}"
    size = lines = 0
    last = b"\n"
    with tempfile.NamedTemporaryFile("wb", dir=folder, suffix=".part", delete=False) as out:
        try:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
                last = chunk[-1:]
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            os.unlink(out.name)
            raise
    if size == 0:
        os.unlink(out.name)
        raise InvalidRequest("file: the file is empty; upload a JSONL file", field="file")
    os.replace(out.name, upload_path(root, file_id))
    stored = StoredFile(
        id=file_id,
        owner=owner,
        filename=filename,
        bytes=size,
        lines=lines + (last != b"\n"),
        created_at=int(time.time()),
    )
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        file_key(file_id),
        mapping={
            "owner": owner,
            "filename": filename,
            "bytes": stored.bytes,
            "lines": stored.lines,
            "created_at": stored.created_at,
            "purpose": stored.purpose,
        },
    )
    pipe.zadd(files_key(owner), {file_id: stored.created_at})
    pipe.execute()
    return stored


def uploaded(client: redis.Redis, file_id: str, owner: str) -> StoredFile:
    """An upload of ``owner``'s, else 404."""
    raw = {k.decode(): v.decode() for k, v in client.hgetall(file_key(file_id)).items()}
    if raw.get("owner") != owner:
        raise not_found(file_id)
    return StoredFile(
        id=file_id,
        owner=owner,
        filename=raw["filename"],
        bytes=int(raw["bytes"]),
        lines=int(raw["lines"]),
        created_at=int(raw["created_at"]),
        purpose=raw.get("purpose", PURPOSE),
    )


def list_uploads(client: redis.Redis, owner: str, after: str | None, limit: int) -> dict[str, Any]:
    """``owner``'s uploads, newest first, as OpenAI's list (``after``, ``limit``)."""
    key = files_key(owner)
    start = 0
    if after is not None:
        rank = client.zrevrank(key, after)
        if not isinstance(rank, int):
            raise InvalidRequest(f"after: no file {after!r} of this key", field="after")
        start = rank + 1
    ids = [i.decode() for i in client.zrange(key, start, start + limit, desc=True)]
    found = [uploaded(client, i, owner).to_openai() for i in ids[:limit]]
    return {
        "object": "list",
        "data": found,
        "first_id": found[0]["id"] if found else None,
        "last_id": found[-1]["id"] if found else None,
        "has_more": len(ids) > limit,
    }


def delete_upload(client: redis.Redis, root: Path, file_id: str, owner: str) -> None:
    uploaded(client, file_id, owner)
    pipe = client.pipeline(transaction=True)
    pipe.delete(file_key(file_id))
    pipe.zrem(files_key(owner), file_id)
    pipe.execute()
    upload_path(root, file_id).unlink(missing_ok=True)


def batch_file(client: redis.Redis, file_id: str, owner: str) -> tuple[BatchInfo, str] | None:
    """The batch and channel an output or error file id names (None: not such an id); 404
    when the batch is unknown or another key's."""
    for suffix, channel in SUFFIXES.items():
        if file_id.startswith("batch_") and file_id.endswith(suffix):
            try:
                info = load(client, file_id.removesuffix(suffix))
            except TaskNotFound:
                raise not_found(file_id) from None
            if info.owner != owner:
                raise not_found(file_id)
            return info, channel
    return None


def batch_file_object(client: redis.Redis, info: BatchInfo, channel: str) -> dict[str, Any]:
    """A batch's output or error file as OpenAI's ``file`` object."""
    size = 0
    if channel == ERRORS:
        size += sum(len(v) + 1 for _, v in client.hscan_iter(batch_rejected_key(info.id)))
    if info.store == STORE_FILE:
        size += int(client.hget(batch_key(info.id), f"{channel}_bytes") or 0)
    else:
        key = batch_output_key(info.id) if channel == OUTPUT else batch_errors_key(info.id)
        size += sum(len(v) + 1 for _, v in client.hscan_iter(key))
    file_id = f"{info.id}-{channel}"
    filename = f"{info.id}_{channel}.jsonl"
    return file_object(file_id, size, int(info.created_at), filename, OUTPUT_PURPOSE)


def batch_lines(client: redis.Redis, info: BatchInfo, root: Path, channel: str) -> Iterator[bytes]:
    """A batch's output or error file, a line at a time."""
    for line in read_output(client, info, root, channel):
        yield line.encode() + b"\n"
