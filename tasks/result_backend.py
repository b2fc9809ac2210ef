"""Celery's Redis result backend, minus the subscription it opens for every task sent, and with
each result stored in one step.

Celery's Redis backend subscribes the sender to each sent task's result channel, so that a
later ``AsyncResult.get()`` can wait on pub/sub. ollama-corral waits on the task's own event
stream instead (:mod:`producers.events`), so for it those subscriptions are pure cost: a
SUBSCRIBE per task on an extra connection, and an UNSUBSCRIBE when the ``AsyncResult`` is
garbage collected, which raises if Redis has gone away by then. ``AsyncResult.get()`` still
works (Flower uses it): it reads the stored result, then subscribes itself.

Celery stores a result in two round trips: it reads the stored one first (a lost worker's late
run must never overwrite a success), then writes and publishes it. Here the same rule runs in
Redis, in one script call per result.

Results are JSON, as Celery writes them, but written and read by orjson where the value is
plain JSON (an embed result of 384 floats: 18 µs to write against kombu's 270): what kombu
writes in a typed form of its own (a datetime, a decimal, bytes) still goes through kombu.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from celery import states
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend
from kombu.utils.encoding import bytes_to_str
from redis.commands.core import Script

from tasks.redis_url import SCHEMES

BACKEND_PATH = "tasks.result_backend:StreamingRedisBackend"

# KEYS[1]: the result's key. ARGV: the encoded result, its TTL in seconds (0: none). Stores and
# publishes it, unless the result stored already is a success (Celery's rule). Returns 1 if
# stored, else 0.
STORE_RESULT = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, meta = pcall(cjson.decode, old)
  if ok and type(meta) == 'table' and meta.status == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


_JSON = ("application/json", "utf-8")
# Values orjson would write otherwise than kombu: handed to _not_plain, which sends them to kombu.
_PLAIN_ONLY = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)
_KOMBU_TYPED = b'"__type__"'  # the mark of a value kombu wrote in its typed form


def _not_plain(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is for kombu's JSON")


class StreamingRedisBackend(RedisBackend):
    _store_script: Script | None = None

    def _encode(self, data: Any) -> tuple[str, str, Any]:
        """Celery's JSON encoding of ``data``, by orjson when it is plain JSON (a UUID is
        written as its text)."""
        if self.serializer == "json":
            try:
                return (*_JSON, orjson.dumps(data, default=_not_plain, option=_PLAIN_ONLY).decode())
            except TypeError:  # orjson.JSONEncodeError included: kombu writes it
                pass
        return super()._encode(data)  # type: ignore[no-any-return]  # Celery's

    def decode(self, payload: Any) -> Any:
        """A stored result, read by orjson unless kombu wrote it in a typed form (or it is
        compressed, or not JSON)."""
        raw = payload.encode() if isinstance(payload, str) else payload
        plain = isinstance(raw, bytes) and raw[:1] == b"{" and _KOMBU_TYPED not in raw
        if self.serializer == "json" and plain:
            try:
                return orjson.loads(raw)
            except ValueError:
                pass
        return super().decode(payload)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Do not subscribe when sending: results are awaited on the task's event stream."""

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Celery's store (the same meta, key, expiry and publish), in one round trip."""
        value = self._encoded_meta(task_id, result, state, request, traceback)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        expires = self.failure_expires if state == states.FAILURE else self.expires
        self.ensure(self._store_once, (self.get_key_for_task(task_id), value, expires))
        return result

    def _store_once(self, key: bytes, value: Any, expires: int | None) -> None:
        self._script()(keys=[key], args=[value, int(expires or 0)], client=self.client)

    def _encoded_meta(
        self, task_id: str, result: Any, state: str, request: Any, traceback: Any = None
    ) -> Any:
        """The stored form of a result: Celery's meta (with the extended fields of
        ``request``), encoded."""
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        return self.encode(meta)

    def _script(self) -> Script:
        script = self._store_script
        if script is None:
            script = self._store_script = self.client.register_script(STORE_RESULT)
        return script

    def success_in(
        self, task_id: str, result: Any, request: Any
    ) -> Callable[[Any], Callable[[list[Any]], None]]:
        """The task's success, stored as Celery would store it when the task returns, as a
        command for a transaction of the task's own (its lease's end). Once that went
        through, the request ignores its result, so that Celery does not store it again; if
        Redis lacked the script (it restarted), Celery stores it as usual."""
        value = self._encoded_meta(
            task_id, self.encode_result(result, states.SUCCESS), states.SUCCESS, request
        )
        args = [self.get_key_for_task(task_id), value, int(self.expires or 0)]
        sha = self._script().sha

        def store(pipe: Any) -> Callable[[list[Any]], None]:
            pipe.evalsha(sha, 1, *args)
            return stored

        def stored(replies: list[Any]) -> None:
            if not isinstance(replies[-1], Exception):
                request.ignore_result = True

        return store

    def store_in(
        self, pipe: Any, task_id: str, outcome: Any, request: Any, *, failed: bool
    ) -> None:
        """In ``pipe``: what Celery's worker stores for a task that returned ``outcome`` (or
        raised it, ``failed``), with the extended fields ``request`` gives, by the same script
        as :meth:`_store_result` (a task run outside Celery's tracer: tasks/take_along.py)."""
        state = states.FAILURE if failed else states.SUCCESS
        value = self._encoded_meta(task_id, self.encode_result(outcome, state), state, request)
        expires = self.failure_expires if failed else self.expires
        key = self.get_key_for_task(task_id)
        self._script()(keys=[key], args=[value, int(expires or 0)], client=pipe)


def backend_url(redis_url: str) -> str:
    """The ``result_backend`` setting for ``redis_url`` (other URL forms: Celery's choice)."""
    scheme = redis_url.split("://", 1)[0]
    return f"{BACKEND_PATH}+{redis_url}" if scheme in SCHEMES else redis_url
