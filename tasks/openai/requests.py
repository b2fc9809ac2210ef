"""An OpenAI request body as a corral task: its kind and payload.

``/v1/chat/completions`` maps to a ``chat`` task (a ``structured`` one for a ``json_schema``
response format, a ``multimodal`` one when a message carries an image) and ``/v1/completions``
to a ``generate`` task. The gateway's routes and batch lines both convert through here.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.errors import InvalidRequest
from tasks.openai.bodies import ChatMessage, ChatRequest, CompletionRequest, EmbeddingRequest

# ``reasoning_effort`` as Ollama's ``think`` (which has no "minimal")
_THINK: dict[str, bool | str] = {
    "none": False,
    "minimal": "low",
    "low": "low",
    "medium": "medium",
    "high": "high",
}


def embedding_task(body: EmbeddingRequest) -> tuple[str, dict[str, Any]]:
    """The task kind and payload for an embeddings request."""
    return "embed", {"model": body.model, "input": body.input, "dimensions": body.dimensions}


def completion_task(body: CompletionRequest) -> tuple[str, dict[str, Any]]:
    """The task kind and payload for a (legacy) text completion request."""
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidRequest(
                "prompt: send one prompt per request (a task has one reply)", field="prompt"
            )
        prompt = prompt[0]
    return "generate", {"model": body.model, "prompt": prompt, "options": body.options()}


def chat_task(body: ChatRequest) -> tuple[str, dict[str, Any]]:
    """The task kind and payload for a chat request (refusing what no kind can carry)."""
    messages = _messages(body.messages)
    has_images = any(m.get("images") for m in messages)
    tools = _tools(body)
    fmt = body.response_format.type if body.response_format else "text"
    think = None if body.reasoning_effort is None else _THINK[body.reasoning_effort]
    options = body.options(body.max_completion_tokens)
    base = {"model": body.model, "messages": messages, "options": options}
    if fmt == "json_schema":
        if tools:
            raise InvalidRequest(
                "tools cannot be combined with a json_schema response format; "
                "send one or the other",
                field="tools",
            )
        if has_images:
            raise InvalidRequest(
                "images cannot be combined with a json_schema response format "
                "here; describe the image first",
                field="response_format",
            )
        schema = body.response_format.json_schema if body.response_format else None
        if schema is None:  # ResponseFormat refuses this already; mypy cannot know
            raise InvalidRequest(
                "response_format: give json_schema.schema", field="response_format"
            )
        return "structured", {
            **base,
            "schema": schema.schema_,
            "think": None if think is None else bool(think),
        }
    if has_images:
        for name, given in (
            ("tools", tools),
            ("response_format", fmt != "text"),
            ("reasoning_effort", think is not None),
        ):
            if given:
                raise InvalidRequest(
                    f"{name} cannot be combined with images here; send the request without {name}",
                    field=name,
                )
        return "multimodal", base
    return "chat", {
        **base,
        "tools": tools,
        "think": think,
        "format": "json" if fmt == "json_object" else None,
    }


def _tools(body: ChatRequest) -> list[dict[str, Any]] | None:
    """The tools to pass to Ollama after ``tool_choice`` (which Ollama has no field for)."""
    choice, tools = body.tool_choice, body.tools or []
    if choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tools = [t for t in tools if (t.get("function") or {}).get("name") == wanted]
        if not tools:
            raise InvalidRequest(
                f"tool_choice names the function {wanted!r}, which is not in "
                "tools; name one of the tools sent",
                field="tool_choice",
            )
    return tools or None


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as Ollama's: parts joined, images inline, tool calls with dict args."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id → function name, for the tool messages after it
    for i, message in enumerate(messages):
        text, images = _content(message, i)
        item: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": text,
        }
        if images:
            item["images"] = images
        if message.tool_calls:
            item["tool_calls"] = []
            for j, call in enumerate(message.tool_calls):
                try:
                    arguments = json.loads(call.function.arguments or "{}")
                except ValueError as exc:
                    where = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise InvalidRequest(
                        f"{where}: not JSON ({exc}); send the arguments as a JSON object in text",
                        field=where,
                    ) from exc
                if call.id:
                    names[call.id] = call.function.name
                item["tool_calls"].append(
                    {"function": {"name": call.function.name, "arguments": arguments}}
                )
        if message.role == "tool" and (name := names.get(message.tool_call_id or "")):
            item["tool_name"] = name
        out.append(item)
    return out


def _content(message: ChatMessage, index: int) -> tuple[str, list[str]]:
    if message.content is None or isinstance(message.content, str):
        return message.content or "", []
    texts, images = [], []
    for j, part in enumerate(message.content):
        if part.type == "text":
            texts.append(part.text)
            continue
        url = part.image_url.url
        if not url.startswith("data:"):
            where = f"messages[{index}].content[{j}].image_url.url"
            raise InvalidRequest(
                f"{where}: this gateway does not fetch images from URLs; send "
                "the image inline as a data URI (data:image/png;base64,...)",
                field=where,
            )
        images.append(url)  # the gateway decodes and checks it (Gateway.submit)
    return "\n".join(texts), images
