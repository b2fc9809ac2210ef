"""Is a model served? Admission refuses a model that nobody serves, naming the closest one.

A model counts as served when a live worker announced it (:mod:`tasks.registry` writes
``corral:sched:served`` with every announcement), or when the ``/api/tags`` of an Ollama host
behind a live worker lists it (the workers cache it in ``corral:sched:offered``): a worker for
it may be started, and the task waits until then. Either counts for ``CORRAL_MODEL_GRACE_S``
after it was last seen, so that a rolling restart of the workers does not refuse work.
"""

from __future__ import annotations

import contextlib
import difflib
import time

import redis

from tasks.errors import InvalidRequest, ModelNotFound
from tasks.keys import SCHED_OFFERED_KEY, SCHED_SERVED_KEY, canonical_model
from tasks.registry import ANNOUNCE_TTL_S
from tasks.settings import Settings

TAGS_EVERY_S = 30.0  # how often a worker reads its host's /api/tags
MAX_LISTED = 12  # served models named in a refusal (the closest one is always named)


def short_name(model: str) -> str:
    """``llama3.2:latest`` → ``llama3.2``, as people type it."""
    return model.removesuffix(":latest")


def note_offered(client: redis.Redis, tags: dict[str, object], now: float | None = None) -> int:
    """Record the models an Ollama host's ``/api/tags`` answer lists; returns how many."""
    names = set()
    for entry in tags.get("models") or []:  # type: ignore[attr-defined]
        if isinstance(entry, dict):
            for field in ("name", "model"):
                with contextlib.suppress(InvalidRequest):  # a name no worker could serve
                    names.add(canonical_model(str(entry.get(field, ""))))
    if names:
        at = time.time() if now is None else now
        client.zadd(SCHED_OFFERED_KEY, dict.fromkeys(names, at))
    return len(names)


def served_since(settings: Settings, now: float) -> tuple[float, float]:
    """The oldest sighting that still counts, for served and for offered models. Even with
    no grace, what live workers serve and their hosts list counts: they are re-announced well
    within these lifetimes."""
    grace = settings.model_grace_s
    return now - max(grace, ANNOUNCE_TTL_S), now - max(grace, 2 * TAGS_EVERY_S)


def served_models(client: redis.Redis, settings: Settings, now: float | None = None) -> list[str]:
    """Every model served or offered within the grace period, sorted."""
    served_from, offered_from = served_since(settings, time.time() if now is None else now)
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(SCHED_SERVED_KEY, served_from, "+inf")
    pipe.zrangebyscore(SCHED_OFFERED_KEY, offered_from, "+inf")
    return sorted({m.decode() for names in pipe.execute() for m in names})


def check_served(client: redis.Redis, model: str, settings: Settings) -> None:
    """Raise :class:`ModelNotFound` (naming the served models and the closest one) unless
    ``model`` is served or offered. One round trip when it is."""
    model = canonical_model(model)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zscore(SCHED_SERVED_KEY, model)
    pipe.zscore(SCHED_OFFERED_KEY, model)
    served_at, offered_at = pipe.execute()
    served_from, offered_from = served_since(settings, now)
    if (served_at or 0) >= served_from or (offered_at or 0) >= offered_from:
        return
    raise unserved(client, model, settings, now)


def unserved(
    client: redis.Redis, model: str, settings: Settings, now: float | None = None
) -> ModelNotFound:
    """The refusal of ``model``, which nobody serves: it names the served models."""
    model = canonical_model(model)
    served = served_models(client, settings, now)
    return ModelNotFound(refusal(model, served), model=model, served=served)


def refusal(model: str, served: list[str]) -> str:
    """What to tell a caller whose model nobody serves."""
    start = f"start a worker for it (corral worker --model {short_name(model)})"
    if not served:
        return f"no worker serves any model yet, so {short_name(model)!r} cannot run; {start}"
    names = [short_name(m) for m in served]
    close = difflib.get_close_matches(short_name(model), names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    listed = ", ".join(names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        listed += f" and {len(names) - MAX_LISTED} more (corral queues lists them)"
    return (
        f"no worker serves model {short_name(model)!r} and no Ollama host has it; {hint}"
        f"served: {listed}. Fix the name, or pull the model on an Ollama host and {start}"
    )
