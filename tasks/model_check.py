"""At a worker's start: does its Ollama host have the models it serves?

A missing model fails every task of its queue with ``ModelNotFound``; saying so at start, with
the command that fixes it, beats finding out from the first failed task.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from tasks.errors import InvalidRequest
from tasks.keys import canonical_model
from workers.ollama_client import OllamaClient
from workers.ollama_errors import OllamaError

log = logging.getLogger("corral.worker")


def missing_models(served: Iterable[str], tags: dict[str, Any]) -> list[str]:
    """The ``served`` models absent from an ``/api/tags`` answer (names compared canonically)."""
    present = set()
    for entry in tags.get("models") or []:
        for key in ("name", "model"):
            with contextlib.suppress(InvalidRequest):  # a name no worker could serve anyway
                present.add(canonical_model(str(entry.get(key, ""))))
    return [model for model in served if canonical_model(model) not in present]


def warn_missing_models(ollama: OllamaClient, served: Sequence[str]) -> None:
    """Log one warning per served model the host lacks, saying how to pull it."""
    try:
        tags = ollama.get_json("/api/tags")
    except OllamaError as exc:
        log.warning(
            "cannot check the models on the Ollama host %s (%s); tasks wait and retry "
            "until it answers",
            ollama.base_url,
            exc.message,
        )
        return
    for model in missing_models(served, tags):
        log.warning(
            "model %s is not on the Ollama host %s: its tasks will fail with "
            "ModelNotFound until it is pulled there (OLLAMA_HOST=%s ollama pull %s)",
            model,
            ollama.base_url,
            ollama.base_url,
            model,
        )
