"""Flower for ollama-corral: ``python -m monitoring.flower [FLOWER OPTIONS]`` (``corral flower``),
or equally ``celery -A monitoring.flower flower [FLOWER OPTIONS]``.

On top of the project's Celery app (``tasks.worker_app``, so the four tasks are registered and
the REST API can submit them), importing this module changes these things in Flower:

- **Every model queue in the Broker tab** and in ``/api/queues/length``. Flower lists only the
  queues of live workers (falling back to ``task_queues`` when none is up), so a model that has
  work waiting but no worker yet would be invisible exactly when it matters. The list is
  extended with every known model queue (models ever submitted, declared queues, announced
  workers), read from Redis at most every few seconds.
- **Each queue's whole backlog.** Its message count adds the tasks the scheduler still holds
  for the model to the messages released to Celery's queue (:data:`tasks.queues.DEPTHS_LUA`,
  one script call for every queue on the page).
- **Tasks read as kind and model**: the kwargs column shows ``model=… prompt=…`` instead of a
  truncated repr of the payload (base64 images included).
- **Submission through the scheduler.** The REST API's ``send-task``, ``async-apply`` and
  ``apply`` of a corral task admit it as the SDK does (:meth:`producers.client.Client.submit`):
  validated, refused when nobody serves the model or its queue is full, and started in the
  scheduler's order, never pushed straight onto the Celery queue (:func:`submit_rest`).

- **Closed by default.** Flower shows every task's prompt (``/task/<id>``) and its REST API
  submits work, so it binds to 127.0.0.1 unless ``--address`` says otherwise, and refuses to
  start without credentials: Flower's own ``--basic-auth=user:pass`` (or ``FLOWER_BASIC_AUTH``),
  or ``--auth`` with an ``--auth_provider``. ``--insecure-no-auth`` serves it open anyway.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery
from celery.bin.celery import main as celery_main
from flower.api.tasks import BaseTaskHandler, TaskApply, TaskAsyncApply, TaskSend
from flower.app import Flower
from flower.options import options
from flower.utils.broker import RedisBase
from flower.views import BaseHandler
from tornado import web

from tasks.errors import CorralError, InvalidRequest, QueueFull
from tasks.keys import model_of_queue, queue_name
from tasks.kinds import registry
from tasks.openai.errors import http_status
from tasks.queues import DEPTH_ARGS, DEPTHS_LUA, depth_keys, known_queues
from tasks.registry import live_workers
from tasks.worker_app import app
from workers.embedded_redis import is_loopback

if TYPE_CHECKING:
    from producers.client import Client

log = logging.getLogger("corral.flower")
DEFAULT_COLUMNS = "name,uuid,state,kwargs,received,started,runtime,worker"
QUEUES_CACHE_S = 5.0
LOOPBACK = "127.0.0.1"
_MODEL_IN_REPR = re.compile(r"""['"]model['"]:\s*['"]([^'"]{1,200})['"]""")


class QueueNames:
    """Known model queues from Redis, cached for a few seconds (Flower asks on every page)."""

    def __init__(self, capp: Celery, ttl_s: float = QUEUES_CACHE_S) -> None:
        self._capp = capp
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._names: list[str] = []
        self._at = float("-inf")

    def get(self) -> list[str]:
        with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                # On a Redis error keep the last answer; Flower still shows the workers' queues.
                with contextlib.suppress(redis.RedisError):
                    self._names = self._read()
                self._at = time.monotonic()
            return list(self._names)

    def _read(self) -> list[str]:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self._capp.conf.broker_url, socket_timeout=2, socket_connect_timeout=2
            )
        names = set(known_queues(self._client))
        for worker in live_workers(self._client):
            names.update(worker.queues)
        return sorted(names)


def install(capp: Celery) -> None:
    """Make Flower list every model queue and show tasks by kind and model (idempotent)."""
    original = getattr(BaseHandler, "get_active_queue_names", None)
    if original is None:  # another Flower version: its own queue list, nothing worse
        log.warning(
            "this Flower has no get_active_queue_names; the Broker tab shows only "
            "the queues of live workers"
        )
    elif getattr(BaseHandler, "_corral_queues", None) is None:
        names = QueueNames(capp)

        def get_active_queue_names(self: BaseHandler) -> list[str]:
            return sorted(set(original(self)) | set(names.get()))

        BaseHandler.get_active_queue_names = get_active_queue_names  # type: ignore[method-assign]
        BaseHandler._corral_queues = names  # type: ignore[attr-defined]
    for handler in (TaskSend, TaskAsyncApply, TaskApply):
        if getattr(handler, "_corral_submit", None) is None:
            handler.post = _submitting(handler.post, wait=handler is TaskApply)  # type: ignore[method-assign]
            handler._corral_submit = True  # type: ignore[attr-defined]
    if getattr(RedisBase, "_corral_lengths", None) is None:
        RedisBase.queues = queue_lengths  # type: ignore[method-assign]
        RedisBase._corral_lengths = True  # type: ignore[attr-defined]
    # Set before Flower parses its options, so a config file, flags and FLOWER_* variables win.
    options.format_task = format_task
    options.tasks_columns = DEFAULT_COLUMNS
    options.address = LOOPBACK  # Flower's own default, "", is every interface
    if "insecure_no_auth" not in options:
        options.define(
            "insecure_no_auth",
            default=False,
            type=bool,
            help="serve without authentication: whoever reaches the address sees "
            "every prompt and may submit tasks",
        )
        start = Flower.start_http_server

        def start_http_server(self: Flower) -> Any:
            refuse_open(self.options)
            return start(self)

        Flower.start_http_server = start_http_server  # type: ignore[method-assign]


# Options of Flower's submit calls that mean something to a corral task: the rest (eta,
# countdown, expires, exchange...) would act around the scheduler, so they are refused.
_REST_OPTIONS = {"queue", "priority", "tenant", "timeout"}
_REST_KWARGS = {"payload", "submitted_at", "deadline_s"}


def _submitting(post: Any, *, wait: bool) -> Any:
    """Flower's submit handler, with corral's tasks sent through :func:`submit_rest`."""

    @web.authenticated  # type: ignore[misc]
    async def corral_post(self: BaseTaskHandler, taskname: str) -> None:
        kind = registry.by_task_name(taskname)
        if kind is None:  # another app's task: Flower's own path (it checks auth itself)
            await post(self, taskname)
            return
        if self.application.options.read_only:
            raise web.HTTPError(403, "Read only mode is enabled")
        await submit_rest(self, kind.name, wait=wait)

    return corral_post


_CLIENT: list[Client] = []  # the producer Flower submits with, opened on first use
_CLIENT_LOCK = threading.Lock()


def _client() -> Client:
    with _CLIENT_LOCK:
        if not _CLIENT:
            from producers.client import Client  # only Flower's submit path needs the SDK

            _CLIENT.append(Client())
        return _CLIENT[0]


def rest_submission(kind: str, args: Any, kwargs: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``Client.submit`` arguments from a Flower submit body, or InvalidRequest naming the field.

    The body is what a ``send_task`` of the task would take: ``{"kwargs": {"payload": {...}},
    "queue": "corral.<model>", "priority": 0-9, "tenant": "..."}``. ``submitted_at`` in the
    kwargs is ignored (admission stamps its own time); ``deadline_s`` is the task's deadline.
    """
    if args:
        raise InvalidRequest(
            'corral tasks take keyword arguments only: {"kwargs": {"payload": {...}}}',
            field="args",
        )
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("payload"), dict):
        raise InvalidRequest(
            'expected {"kwargs": {"payload": {...}}}, the payload the SDK sends', field="kwargs"
        )
    if unknown := sorted(set(kwargs) - _REST_KWARGS):
        raise InvalidRequest(f"unknown argument {unknown[0]!r} of a corral task", field=unknown[0])
    if refused := sorted(set(options) - _REST_OPTIONS):
        raise InvalidRequest(
            f"option {refused[0]!r} is not supported for corral tasks: the scheduler decides "
            "when a task runs (give priority or tenant instead)",
            field=refused[0],
        )
    payload = kwargs["payload"]
    queue = options.get("queue")
    if queue is not None and queue != queue_name(str(payload.get("model", ""))):
        raise InvalidRequest(
            f"queue {queue!r} is not the queue of model {payload.get('model')!r}; leave it out "
            "(the model decides the queue)",
            field="queue",
        )
    submission: dict[str, Any] = {"kind": kind, "data": payload}
    for name in ("priority", "tenant"):
        if options.get(name) is not None:
            submission[name] = options[name]
    if kwargs.get("deadline_s") is not None:
        submission["deadline_s"] = kwargs["deadline_s"]
    return submission


async def submit_rest(handler: BaseTaskHandler, kind: str, *, wait: bool) -> None:
    """Admit a task sent to Flower's REST API; answer as Flower does (``task-id``, ``state``),
    with its queue ``position``, or a typed error: 400 bad input, 404 a model nobody serves,
    429 (with ``Retry-After``) a full queue, 503 Redis unreachable."""
    args, kwargs, options = handler.get_task_args()
    timeout = options.pop("timeout", None)
    try:
        submission = rest_submission(kind, args, kwargs, options)
    except CorralError as exc:
        _write_error(handler, exc)
        return
    admitted = await handler.run_blocking("task.publish", kind, _admit, submission)
    if isinstance(admitted, CorralError):
        _write_error(handler, admitted)
        return
    task_id, position = admitted
    response: dict[str, Any] = {"task-id": task_id, "state": "PENDING", "position": position}
    if wait:
        try:
            seconds = float(timeout) if timeout is not None else None
        except (TypeError, ValueError) as exc:
            raise web.HTTPError(400, "Invalid timeout") from exc
        result = handler.capp.AsyncResult(task_id)
        response = await handler.run_blocking(
            "task.result_wait", task_id, TaskApply.wait_results, handler, result, response, seconds
        )
    handler.write(response)


def _admit(submission: dict[str, Any]) -> tuple[str, int] | CorralError:
    """Submit (blocking); the task's id and position, or the typed error that refused it
    (returned, since Flower's runner turns whatever is raised into a bare 500)."""
    submission = dict(submission)
    kind, data = submission.pop("kind"), submission.pop("data")
    try:
        job = _client().submit(kind, data, **submission)
        # None once it started (a free slot takes it at once): nothing starts before it, as the
        # gateway's X-Corral-Queue-Position says too.
        return job.id, job.position() or 0
    except CorralError as exc:
        return exc


def _write_error(handler: BaseTaskHandler, error: CorralError) -> None:
    handler.set_status(http_status(error))
    if isinstance(error, QueueFull) and error.retry_after_s is not None:
        handler.set_header("Retry-After", str(max(1, math.ceil(error.retry_after_s))))
    handler.set_header("Content-Type", "application/json; charset=UTF-8")
    handler.finish(json.dumps({"error": error.to_dict()}))


async def queue_lengths(self: RedisBase, names: Iterable[str]) -> list[dict[str, Any]]:
    """Flower's queue lengths (Broker tab, ``/api/queues/length``), each a model's whole
    backlog: its Celery queue's messages plus the scheduler's pending tasks."""
    names = list(names)
    try:
        script = self.redis.register_script(DEPTHS_LUA)
        counts = await script(keys=depth_keys(names), args=list(DEPTH_ARGS))
        return [{"name": n, "messages": int(c)} for n, c in zip(names, counts, strict=True)]
    finally:
        await self.redis.aclose()


def refuse_open(opts: Any) -> None:
    """Exit (status 2) before listening without credentials, unless told --insecure-no-auth."""
    where = opts.unix_socket or opts.address or "every interface"
    if opts.basic_auth or opts.auth:
        return
    if opts.insecure_no_auth:
        if not (opts.unix_socket or is_loopback(opts.address)):
            log.warning(
                "Flower serves %s without authentication (--insecure-no-auth): whoever "
                "reaches it sees every prompt and may submit tasks",
                where,
            )
        return
    print(
        f"error: refusing to serve Flower on {where} without authentication: it shows every "
        "task's prompt and its REST API submits tasks. Pass --basic-auth=user:password (or set "
        "FLOWER_BASIC_AUTH), or --auth with an --auth_provider; --insecure-no-auth serves it "
        "open",
        file=sys.stderr,
    )
    sys.exit(2)


def format_task(task: Any) -> Any:
    """Flower's display hook: replace the kwargs repr with ``model=… prompt=…``."""
    if registry.by_task_name(str(getattr(task, "name", None))) is None:
        return task
    task.kwargs = describe_kwargs(getattr(task, "kwargs", None), getattr(task, "routing_key", None))
    return task


def describe_kwargs(kwargs_repr: Any, routing_key: Any = None) -> str:
    """A one-line summary of a task's kwargs repr (as task events carry it, maybe truncated)."""
    text = str(kwargs_repr or "")
    payload: dict[str, Any] = {}
    try:
        value = ast.literal_eval(text)
        if isinstance(value, dict) and isinstance(value.get("payload"), dict):
            payload = value["payload"]
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    model = payload.get("model")
    if not model and isinstance(routing_key, str) and routing_key.startswith("corral."):
        model = model_of_queue(routing_key)
    if not model and (match := _MODEL_IN_REPR.search(text)):
        model = match.group(1)
    parts = [f"model={model or '?'}"]
    prompt = payload.get("prompt")
    messages = payload.get("messages")
    if not prompt and isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        prompt = messages[-1].get("content")
        parts.append(f"messages={len(messages)}")
    if isinstance(prompt, str):
        parts.append(f"prompt={_shorten(prompt)!r}")
    if isinstance(payload.get("images"), list):
        parts.append(f"images={len(payload['images'])}")
    if "schema" in payload:
        parts.append("schema=yes")
    return " ".join(parts)


def _shorten(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


install(app)  # for `celery -A monitoring.flower flower`: this module is the app's entry point


def main(argv: list[str] | None = None) -> None:
    """Run Flower with this app; arguments are Flower's (``--port``, ``--basic-auth``...)."""
    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["celery", "-A", "monitoring.flower", "flower", *args]
    celery_main()


if __name__ == "__main__":
    main()
