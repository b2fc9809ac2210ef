"""Where a batch's output and error lines go: Redis for small batches, files for large ones.

One process at a time writes a batch's outcomes: the holder of its writer lock. A write is
"append, then commit": the lines go to the store, then one Lua step, run only while the lock is
still ours, marks their entries done, closes their tasks and counts them. For the file store
the commit also records the files' committed lengths, and a new holder first cuts the files
back to them, so a crash between append and commit leaves no line twice: the lines are written
again by the next holder, from the tasks' stored outcomes. A holder whose commit failed (Redis
vanished) cuts its files back the same way before its next write.

The lock is a lease, and a writer may stop for longer than it (a suspended process, a paused
VM) between checking its lock and appending. So the files are also locked (``flock``) for the
whole of each write, lock check included: a writer whose lease lapsed meanwhile appends at
most an uncommitted tail, which the next holder, locking the files after it, cuts away. Until
then the next holder writes nothing (its steps still answer at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from tasks.batches.records import STORE_FILE, BatchInfo
from tasks.keys import (
    batch_done_key,
    batch_errors_key,
    batch_key,
    batch_open_key,
    batch_output_key,
    batch_rejected_key,
    batch_writer_key,
)

WRITER_TTL_MS = 10_000  # a writer that died frees the batch this long after its last renewal
OUTPUT, ERRORS = "output", "errors"

_COMMIT = """
if redis.call('GET', KEYS[6]) ~= ARGV[1] then return 0 end
for _, e in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('SADD', KEYS[2], e[1]) == 1 then
    if e[4] ~= '' then redis.call('HSET', e[3] == 'output' and KEYS[4] or KEYS[5], e[1], e[4]) end
    if e[2] ~= '' then redis.call('HDEL', KEYS[3], e[2]) end
    redis.call('HINCRBY', KEYS[1], e[5], 1)
  end
end
if ARGV[3] ~= '' then
  local sizes = cjson.decode(ARGV[3])
  redis.call('HSET', KEYS[1], 'output_bytes', sizes[1], 'errors_bytes', sizes[2])
end
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Entry:
    """One outcome to write: ``key`` (the custom_id) is written at most once."""

    key: str
    task_id: str
    channel: str  # OUTPUT or ERRORS
    line: str  # the JSON line, without its newline
    counter: str  # completed or failed


class LostWriter(Exception):
    """Another process took the batch's writer lock (ours lapsed): stop writing."""


def batch_folder(root: Path, batch_id: str) -> Path:
    return root.expanduser() / batch_id


class Writer:
    """Holds a batch's writer lock and writes its outcomes to the batch's store."""

    def __init__(self, client: redis.Redis, info: BatchInfo, root: Path) -> None:
        self.redis = client
        self.info = info
        self.token = uuid.uuid4().hex
        self.held = False
        self._folder = batch_folder(root, info.id)
        self._files: dict[str, IO[bytes]] = {}
        self._commit = client.register_script(_COMMIT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Take or keep the lock; False while another live process holds it."""
        key = batch_writer_key(self.info.id)
        if self.held and self._renew(keys=[key], args=[self.token, WRITER_TTL_MS]):
            return True
        self.close_files()  # opened again, and cut back, by the next write
        self.held = bool(self.redis.set(key, self.token, nx=True, px=WRITER_TTL_MS))
        return self.held

    @contextlib.contextmanager
    def _files_locked(self) -> Iterator[None]:
        """The batch's files to this writer alone (a no-op for the Redis store)."""
        if self.info.store != STORE_FILE:
            yield
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        with open(self._folder / "writer.lock", "ab") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
            except BlockingIOError as exc:  # a writer stopped mid-write: it finishes first
                raise LostWriter(f"another process is writing batch {self.info.id}") from exc
            yield

    def _open_files(self) -> None:
        """Open the files, cut back to what was committed (a dead writer may have left more)."""
        sizes = self.redis.hmget(batch_key(self.info.id), ["output_bytes", "errors_bytes"])
        for channel, size in zip((OUTPUT, ERRORS), sizes, strict=True):
            path = self._folder / f"{channel}.jsonl"
            handle = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 (kept open)
            handle.truncate(int(size or 0))
            handle.seek(0, os.SEEK_END)
            self._files[channel] = handle

    def written(self, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        found = self.redis.smismember(batch_done_key(self.info.id), keys)
        return [bool(flag) for flag in found]

    def write(self, entries: list[Entry]) -> None:
        """Append the entries not written yet and commit them; :class:`LostWriter` when the lock
        is no longer ours (nothing is committed then)."""
        if not entries:
            return
        with self._files_locked():
            self._write(entries)

    def _write(self, entries: list[Entry]) -> None:
        if not self.hold():
            raise LostWriter(f"another process writes batch {self.info.id} now")
        if self.info.store == STORE_FILE and not self._files:
            self._open_files()
        done = self.written([e.key for e in entries])
        fresh = [e for e, was in zip(entries, done, strict=True) if not was]
        try:
            committed = self._append_and_commit(fresh)
        except BaseException:
            # Whether the commit ran is unknown (Redis vanished, the disk filled): the files may
            # end in lines nobody committed, so the next write opens them again and cuts them.
            self.close_files()
            raise
        if not committed:
            self.held = False
            raise LostWriter(f"another process writes batch {self.info.id} now")

    def _append_and_commit(self, fresh: list[Entry]) -> bool:
        sizes = ""
        if self.info.store == STORE_FILE:
            for entry in fresh:
                self._files[entry.channel].write(entry.line.encode() + b"\n")
            for handle in self._files.values():
                handle.flush()
                os.fsync(handle.fileno())
            sizes = json.dumps([self._files[OUTPUT].tell(), self._files[ERRORS].tell()])
        inline = self.info.store != STORE_FILE
        rows = [[e.key, e.task_id, e.channel, e.line if inline else "", e.counter] for e in fresh]
        ident = self.info.id
        keys = [
            batch_key(ident),
            batch_done_key(ident),
            batch_open_key(ident),
            batch_output_key(ident),
            batch_errors_key(ident),
            batch_writer_key(ident),
        ]
        return bool(self._commit(keys=keys, args=[self.token, json.dumps(rows), sizes]))

    def close_files(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def close(self) -> None:
        self.close_files()
        if self.held:
            self.held = False
            with contextlib.suppress(redis.RedisError):  # unreachable: the lock lapses by itself
                self._release(keys=[batch_writer_key(self.info.id)], args=[self.token])


def read_lines(client: redis.Redis, info: BatchInfo, root: Path, channel: str) -> Iterator[str]:
    """The committed lines of one channel (output or errors); refused input lines first among
    the errors. Streamed: a large output file is never held whole."""
    if channel == ERRORS:
        for _, line in client.hscan_iter(batch_rejected_key(info.id), count=500):
            yield line.decode()
    if info.store != STORE_FILE:
        key = batch_output_key(info.id) if channel == OUTPUT else batch_errors_key(info.id)
        for _, line in client.hscan_iter(key, count=500):
            yield line.decode()
        return
    size = client.hget(batch_key(info.id), f"{channel}_bytes")
    committed = int(size or 0)
    path = batch_folder(root, info.id) / f"{channel}.jsonl"
    if not committed or not path.exists():
        return
    with open(path, "rb") as handle:
        read = 0
        for raw in handle:
            read += len(raw)
            if read > committed:
                return  # an uncommitted tail, cut by the next writer
            yield raw.decode().rstrip("\n")


def parse(line: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value
