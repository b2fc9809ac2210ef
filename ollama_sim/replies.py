"""What a simulated model says: thinking, text, JSON documents or tool calls, decided up front."""

from __future__ import annotations

import json
import random
import re
import string
import zlib
from dataclasses import dataclass, field
from typing import Any

from .config import ModelSpec
from .images import ImageInfo
from .schema import break_instance, instance_for
from .textgen import json_tokens, keywords, reply_source, seed_for, thinking_tokens, words_to_tokens

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_CAPITALISED = re.compile(r"(?<![.!?]\s)(?<!^)\b[A-Z][a-z]{2,}")
IMAGE_PROMPT_TOKENS = 576
_ORDINALS = ("first", "second", "third", "fourth", "fifth")


@dataclass
class ReplyRequest:
    """The parts of a generate or chat request that decide the reply."""

    model: ModelSpec
    prompt: str
    """The generate prompt, or the last message's content for chat."""
    seed_material: Any
    prompt_text_len: int
    last_role: str = "user"
    images: list[ImageInfo] = field(default_factory=list)
    think: bool = False
    fmt: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    invalid_format: bool = False
    base_seed: int = 0
    max_tokens: int = 40_960
    """The reply's token budget: see :func:`token_budget`."""


@dataclass
class Reply:
    thinking: list[str]
    content: list[str]
    tool_calls: list[dict[str, Any]]
    done_reason: str
    prompt_tokens: int
    tool_tokens: int = 0

    @property
    def eval_count(self) -> int:
        return len(self.thinking) + len(self.content) + self.tool_tokens

    def context_ids(self, prompt: str) -> list[int]:
        """Token ids for generate's deprecated ``context`` field (prompt then output)."""
        words = _TOKEN_RE.findall(prompt)[: self.prompt_tokens]
        ids = [zlib.crc32(w.encode()) % 128_000 for w in words]
        ids += [zlib.crc32(t.encode()) % 128_000 for t in self.content]
        return ids or [1]


def count_prompt_tokens(text_len: int, text: str, images: int) -> int:
    return max(1, len(_TOKEN_RE.findall(text)) + 8) + images * IMAGE_PROMPT_TOKENS


def compose(req: ReplyRequest) -> Reply:
    """Decide the whole reply for a request, deterministically."""
    seed = seed_for(req.base_seed, req.model.name, req.seed_material, req.options.get("seed"))
    prompt_tokens = count_prompt_tokens(req.prompt_text_len, req.prompt, len(req.images))
    thinking = thinking_tokens(seed, req.prompt) if req.think else []
    called = _mentioned_tools(req)
    if called:
        calls = _tool_calls(called, req.prompt, seed)
        tool_tokens = len(json_tokens(json.dumps(calls)))
        return _limit(Reply(thinking, [], calls, "stop", prompt_tokens, tool_tokens), req)
    if req.fmt is not None:
        content = json_tokens(_document(req, seed))
    else:
        source = reply_source(seed, req.prompt)
        lead = _describe_images(req.images)
        budget = min(_num_predict(req.options), req.max_tokens)
        if budget:
            content = lead + source.tokens(max(0, budget - len(thinking) - len(lead)))
        else:
            content = lead + source.natural(opener=not lead)
        if lead and len(content) > len(lead) and not content[len(lead)].startswith(" "):
            content[len(lead)] = " " + content[len(lead)]
    reply = _limit(Reply(thinking, content, [], "stop", prompt_tokens), req)
    return _apply_stop(reply, req.options.get("stop") or [])


def _num_predict(options: dict[str, Any]) -> int:
    value = options.get("num_predict")
    return int(value) if isinstance(value, int | float) and value > 0 else 0


def token_budget(options: dict[str, Any], num_ctx: int, cap: int) -> int:
    """The most tokens a reply may have. Ollama bounds ``num_predict`` (and open-ended replies)
    by ten context windows (``boundedNumPredict`` in ``llm/llama_server.go``); the simulator
    also never generates more than ``cap`` (``SimConfig.max_reply_tokens``)."""
    limit = 10 * num_ctx
    asked = _num_predict(options)
    return min(asked if 0 < asked <= limit else limit, cap)


def _limit(reply: Reply, req: ReplyRequest) -> Reply:
    """Apply the token budget: output reaching it ends with done_reason ``length``."""
    budget = req.max_tokens
    if _num_predict(req.options):
        budget = min(budget, _num_predict(req.options))
    if reply.eval_count < budget or (reply.tool_calls and reply.eval_count == budget):
        return reply
    reply.done_reason = "length"
    reply.thinking = reply.thinking[:budget]
    reply.content = reply.content[: budget - len(reply.thinking)]
    if reply.tool_calls:
        reply.tool_calls, reply.tool_tokens = [], 0
    return reply


def _apply_stop(reply: Reply, stops: list[str]) -> Reply:
    stops = [s for s in stops if s]
    if not stops or not reply.content:
        return reply
    text = ""
    for index, token in enumerate(reply.content):
        before = len(text)
        text += token
        hits = [text.find(s, max(0, before - len(s) + 1)) for s in stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            cut = min(hits)
            kept = reply.content[:index]
            if cut > before:
                kept.append(text[before:cut])
            reply.content = kept
            reply.done_reason = "stop"
            break
    return reply


def _describe_images(images: list[ImageInfo]) -> list[str]:
    words: list[str] = []
    for index, info in enumerate(images):
        subject = "The image" if len(images) == 1 else f"The {_ORDINALS[min(index, 4)]} image"
        words += [
            *subject.split(),
            "is",
            "a",
            f"{info.width}x{info.height}",
            info.format,
            "picture",
            ".",
        ]
    return words_to_tokens(words)


def _document(req: ReplyRequest, seed: int) -> str:
    if isinstance(req.fmt, dict):
        doc = instance_for(req.fmt, seed, _hints(req.prompt))
        if req.invalid_format:
            broken = break_instance(req.fmt, doc)
            if broken is not None:
                return json.dumps(broken, indent=2)
            return json.dumps(doc, indent=2)[:-1]
        return json.dumps(doc, indent=2)
    rng = random.Random(seed)
    source = reply_source(seed, req.prompt)
    topic = keywords(req.prompt, 1)
    doc = {
        "answer": "".join(source.sentence()).strip(),
        "topic": topic[0] if topic else "general",
        "confidence": round(rng.uniform(0.5, 0.99), 2),
    }
    text = json.dumps(doc)
    return text[:-1] if req.invalid_format else text


def _hints(prompt: str) -> list[str]:
    return _CAPITALISED.findall(prompt)


def _mentioned_tools(req: ReplyRequest) -> list[dict[str, Any]]:
    if not req.tools or req.last_role != "user":
        return []
    prompt = req.prompt.lower()
    found = []
    for tool in req.tools:
        name = ((tool or {}).get("function") or {}).get("name") or ""
        if name and (name.lower() in prompt or name.lower().replace("_", " ") in prompt):
            found.append(tool)
    return found


def _tool_calls(tools: list[dict[str, Any]], prompt: str, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    calls = []
    for index, tool in enumerate(tools):
        function = tool["function"]
        parameters = function.get("parameters")
        arguments = {}
        if isinstance(parameters, dict):
            value = instance_for(parameters, seed + index, _hints(prompt))
            arguments = value if isinstance(value, dict) else {}
        call_id = "call_" + "".join(
            rng.choice(string.ascii_lowercase + string.digits) for _ in range(8)
        )
        calls.append(
            {
                "id": call_id,
                "function": {"index": index, "name": function["name"], "arguments": arguments},
            }
        )
    return calls
