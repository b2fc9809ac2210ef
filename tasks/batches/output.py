"""A batch's output and error lines, exactly as OpenAI's Batch API writes them.

``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``: a line
that ran carries the reply OpenAI's endpoint would have answered (an error body with its status
for a task that failed); a line that never ran (refused, cancelled, expired) has ``response``
null and ``error`` ``{"code", "message"}``.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tasks.batches.lines import CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL, Rejected
from tasks.errors import CorralError
from tasks.openai import chat_completion, embedding_list, text_completion
from tasks.openai.errors import described

# Why a line that never finished did not run, as OpenAI's error codes say it.
STOPPED_CODES = {"cancelled": "batch_cancelled", "expired": "batch_expired"}


def line_id(task_id: str) -> str:
    return "batch_req_" + task_id.replace("-", "")


def dumps(line: dict[str, Any]) -> str:
    return json.dumps(line, separators=(",", ":"), ensure_ascii=False)


def _line(
    task_id: str,
    custom_id: str | None,
    response: dict[str, Any] | None,
    error: dict[str, str] | None,
) -> dict[str, Any]:
    return {"id": line_id(task_id), "custom_id": custom_id, "response": response, "error": error}


def succeeded(
    task_id: str, custom_id: str, line: dict[str, Any], result: dict[str, Any], created: int
) -> dict[str, Any]:
    """The line of a task that succeeded: the endpoint's reply object. ``line`` is the task's
    open entry: its url, kind, model and, for embeddings, the encoding asked for."""
    url, model = line["url"], line["model"]
    body: dict[str, Any]
    if url == CHAT_URL:
        body = chat_completion(result, reply_id=f"chatcmpl-{task_id}", model=model, created=created)
    elif url == COMPLETIONS_URL:
        body = text_completion(result, reply_id=f"cmpl-{task_id}", model=model, created=created)
    elif url == EMBEDDINGS_URL:
        body = embedding_list(
            result, model=model, encoding_format=line.get("encoding_format", "float")
        )
    else:  # corral's own /v1/tasks/{kind}: the task as GET /v1/tasks/{id} shows it
        body = {
            "id": task_id,
            "status": "succeeded",
            "kind": line["kind"],
            "model": model,
            "result": result,
        }
    response = {"status_code": 200, "request_id": task_id, "body": body}
    return _line(task_id, custom_id, response, None)


def failed(task_id: str, custom_id: str, error: CorralError) -> dict[str, Any]:
    """The line of a task that failed: OpenAI's error body with the status it would answer."""
    status, body = described(error)
    return _line(
        task_id, custom_id, {"status_code": status, "request_id": task_id, "body": body}, None
    )


def stopped(task_id: str, custom_id: str, why: str) -> dict[str, Any]:
    """The line of a task stopped by the batch's cancel or expiry."""
    message = (
        "the batch was cancelled before this request finished"
        if why == "cancelled"
        else "the batch's completion window ended before this request finished"
    )
    return _line(task_id, custom_id, None, {"code": STOPPED_CODES[why], "message": message})


def rejected(batch_id: str, line: Rejected) -> dict[str, Any]:
    """The line of a refused input line: the typed error's code and what to do about it."""
    ident = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{batch_id}/{line.entry}"))
    return _line(ident, line.custom_id, None, {"code": line.code, "message": line.message})
