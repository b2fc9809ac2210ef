"""What every kind's runner shares: the request fields and the result fields all kinds have."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tasks.payloads import BasePayload
from tasks.results import METRIC_FIELDS, OllamaMetrics

if TYPE_CHECKING:
    from tasks.execution import Execution, Reply


def request_body(payload: BasePayload) -> dict[str, Any]:
    """The fields of an Ollama request that every kind sends."""
    body: dict[str, Any] = {"model": payload.model}
    if payload.options is not None:
        body["options"] = payload.options.model_dump(exclude_none=True)
    if payload.keep_alive is not None:
        body["keep_alive"] = payload.keep_alive
    return body


def result_fields(run: Execution, payload: BasePayload, reply: Reply) -> dict[str, Any]:
    """The fields of :class:`~tasks.results.TaskResult` that a runner knows (the worker adds
    the timings, its name and the Ollama host)."""
    final = reply.final
    return {
        "task_id": run.task_id,
        "model": payload.model,
        "done_reason": final.get("done_reason"),
        "metrics": OllamaMetrics(**{k: final[k] for k in METRIC_FIELDS if k in final}),
        "attempts": run.attempts,
    }
