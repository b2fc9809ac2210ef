"""A task's result as OpenAI's whole reply objects (``chat.completion``, ``text_completion``).

The gateway's streamed chunks are built from the same pieces (producers/gateway/openai_replies.py).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from tasks.results import parse_result


def usage(result: dict[str, Any]) -> dict[str, int]:
    metrics = result.get("metrics") or {}
    prompt, completion = metrics.get("prompt_eval_count") or 0, metrics.get("eval_count") or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def text_of(result: dict[str, Any]) -> tuple[str, str]:
    """The reply's text and thinking, whatever the kind."""
    typed = parse_result(result)
    text = getattr(typed, "text", None)
    if text is None:
        text = getattr(typed, "raw_text", "")
    message = result.get("message") or {}
    return str(text), message.get("thinking") or result.get("thinking") or ""


def finish_reason(result: dict[str, Any]) -> str:
    if (result.get("message") or {}).get("tool_calls"):
        return "tool_calls"
    return "length" if result.get("done_reason") == "length" else "stop"


def tool_calls(result: dict[str, Any], reply_id: str, indexed: bool) -> list[dict[str, Any]]:
    """The reply's tool calls in OpenAI's shape (``indexed`` for stream chunks)."""
    calls = (result.get("message") or {}).get("tool_calls") or []
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        arguments = function.get("arguments")
        out.append(
            {
                **({"index": index} if indexed else {}),
                "id": call.get("id") or f"call_{reply_id[-12:]}_{index}",
                "type": "function",
                "function": {
                    "name": function.get("name", ""),
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments or {}),
                },
            }
        )
    return out


def chat_completion(
    result: dict[str, Any], *, reply_id: str, model: str, created: int
) -> dict[str, Any]:
    """The ``chat.completion`` object of a finished chat, structured or multimodal task."""
    text, thinking = text_of(result)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if thinking:
        message["reasoning_content"] = thinking
    if calls := tool_calls(result, reply_id, indexed=False):
        message["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason(result),
    }
    return {
        "id": reply_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(result),
    }


def text_completion(
    result: dict[str, Any], *, reply_id: str, model: str, created: int
) -> dict[str, Any]:
    """The ``text_completion`` object of a finished generate task."""
    reason = "length" if result.get("done_reason") == "length" else "stop"
    choice = {"text": text_of(result)[0], "index": 0, "logprobs": None, "finish_reason": reason}
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(result),
    }


def embedding_list(
    result: dict[str, Any], *, model: str, encoding_format: str = "float"
) -> dict[str, Any]:
    """The ``list`` of ``embedding`` objects of a finished embed task (``base64``: the vector's
    little-endian float32 bytes, as OpenAI encodes them)."""
    data = []
    for index, vector in enumerate(result.get("embeddings") or []):
        encoded: Any = vector
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = (result.get("metrics") or {}).get("prompt_eval_count") or 0
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
