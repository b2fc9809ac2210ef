"""A worker's standing part in scheduling, besides the start and end of its tasks.

- **A release timer.** Every ``RELEASE_EVERY_S`` the worker releases for its Ollama host, so
  a lost trigger (a producer that died between admit and release, a worker killed mid-task)
  only delays work, and a worker that comes up finds the work that waited for it. On its first
  round and every ``REINDEX_EVERY_S`` it also rebuilds the indexes a release reads.
- **A watch on its Ollama host.** ``/api/ps`` says what the host has loaded and how many
  models it keeps at once (the most it was seen holding, unless ``CORRAL_MAX_LOADED_MODELS``
  says); ``/api/tags`` lists the models it has, for admission (:mod:`.served`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tasks.errors import InvalidRequest
from tasks.keys import canonical_model
from tasks.scheduler.pending import Scheduler
from tasks.scheduler.release import Releaser
from tasks.scheduler.served import TAGS_EVERY_S, note_offered
from tasks.settings import Settings
from workers.ollama_errors import OllamaError

log = logging.getLogger("corral.worker")

RELEASE_EVERY_S = 1.0
# How often the timer also rebuilds the indexes a release reads (Scheduler.reindex): they are
# kept by every step, so this only finds work that an older producer admitted without them.
REINDEX_EVERY_S = 60.0
PS_EVERY_S = 5.0


def loaded_models(ps: dict[str, Any]) -> list[str]:
    """The models an ``/api/ps`` answer lists, by canonical name."""
    names = []
    for entry in ps.get("models") or []:
        if isinstance(entry, dict):
            with contextlib.suppress(InvalidRequest):
                names.append(canonical_model(str(entry.get("name") or entry.get("model") or "")))
    return names


class HostWatch:
    """What one Ollama host has loaded and lists, written where the scheduler reads it."""

    def __init__(
        self, scheduler: Scheduler, host: str, get_json: Callable[[str], dict[str, Any]]
    ) -> None:
        self.scheduler = scheduler
        self.host = host
        self.get_json = get_json
        self.most_loaded = 0  # the most models the host was seen holding at once
        self.tags_at = -float("inf")

    @property
    def settings(self) -> Settings:
        return self.scheduler.settings

    def look(self) -> None:
        """Read ``/api/ps`` (and ``/api/tags`` when due) once; never raises."""
        with contextlib.suppress(OllamaError, redis.RedisError):
            loaded = loaded_models(self.get_json("/api/ps"))
            self.most_loaded = max(self.most_loaded, len(loaded))
            resident = self.settings.max_loaded_models or max(1, self.most_loaded)
            self.scheduler.note_loaded(self.host, loaded, resident=resident)
        if time.monotonic() - self.tags_at >= TAGS_EVERY_S:
            with contextlib.suppress(OllamaError, redis.RedisError):
                note_offered(self.scheduler.redis, self.get_json("/api/tags"))
                self.tags_at = time.monotonic()


def start_upkeep(releaser: Releaser, watch: HostWatch) -> threading.Event:
    """Run the release timer and the host watch until the returned event is set."""
    stop = threading.Event()

    def release() -> None:
        reindexed = -float("inf")
        while not stop.wait(RELEASE_EVERY_S):
            try:
                if time.monotonic() - reindexed >= REINDEX_EVERY_S:
                    releaser.scheduler.reindex(watch.host)
                    reindexed = time.monotonic()
                releaser.for_host(watch.host)
            except redis.RedisError:
                continue  # Redis is restarting: the next round releases
            except Exception:  # the timer must outlive any one failure; say what broke
                log.exception("releasing for %s failed; trying again", watch.host)

    def look() -> None:
        while True:
            watch.look()
            if stop.wait(PS_EVERY_S):
                break

    threading.Thread(target=release, name="release", daemon=True).start()
    threading.Thread(target=look, name="host-watch", daemon=True).start()
    return stop
