"""Delivering a reply: prompt-eval delay, token pacing, NDJSON chunks, metrics and faults.

The NDJSON lines for tokens are assembled from pre-encoded pieces, because at zero delay this
loop is the simulator's hot path.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from dataclasses import dataclass
from typing import Any

from .faults import RUNNER_STOPPED, FaultPlan
from .gojson import dumps
from .golike import utc_timestamp
from .http import Response
from .replies import Reply
from .stats import EventLog, Stats

_BATCH_TOKENS = 256
_token_cache: dict[str, bytes] = {}


class RunnerError(Exception):
    """An error raised by the (simulated) runner: answered with its status before the first
    token, or as an in-band ``{"error": ...}`` line after it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_token(text: str) -> bytes:
    encoded = _token_cache.get(text)
    if encoded is None:
        encoded = dumps(text).encode()
        if len(_token_cache) < 50_000:
            _token_cache[text] = encoded
    return encoded


def metrics(
    total_ns: int, load_ns: int, prompt_count: int, prompt_ns: int, eval_count: int, eval_ns: int
) -> dict[str, int]:
    """The six metric fields, zero values left out (Go ``omitempty``)."""
    values = {
        "total_duration": total_ns,
        "load_duration": load_ns,
        "prompt_eval_count": prompt_count,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_count,
        "eval_duration": eval_ns,
    }
    return {k: v for k, v in values.items() if v}


def logprob_entry(text: str, position: int, top: int) -> dict[str, Any]:
    """Deterministic log probabilities for the token at ``position``: the chosen token first
    among ``top`` alternatives, as Ollama lists them."""
    chosen = -(zlib.crc32(f"{position}:{text}".encode()) % 2000) / 1000

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    out = entry(text, chosen)
    if top:
        alternatives = [
            entry(f"{text.strip() or text}{n}", round(chosen - 0.5 * n, 3)) for n in range(1, top)
        ]
        out["top_logprobs"] = [entry(text, chosen), *alternatives]
    return out


class ChunkEncoder:
    """Builds the JSON objects of one generate or chat response."""

    def __init__(self, chat: bool, model: str, top_logprobs: int | None = None) -> None:
        self.chat = chat
        self.model = model
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.logprobs: list[dict[str, Any]] = []  # every token's, for a non-stream reply
        self._prefix = b'{"model":' + dumps(model).encode() + b',"created_at":"'
        if chat:
            self._content = b'","message":{"role":"assistant","content":'
            self._thinking = b'","message":{"role":"assistant","content":"","thinking":'
            self._end = b'},"done":false}\n'
        else:
            self._content = b'","response":'
            self._thinking = b'","response":"","thinking":'
            self._end = b',"done":false}\n'

    def token_line(self, text: str, thinking: bool) -> bytes:
        if self.top_logprobs is not None:
            return self._token_line_with_logprobs(text, thinking)
        middle = self._thinking if thinking else self._content
        return b"".join(
            (self._prefix, utc_timestamp().encode(), middle, _json_token(text), self._end)
        )

    def note_logprobs(self, text: str) -> dict[str, Any] | None:
        """The token's logprobs entry (kept for a non-stream reply), or None if not asked."""
        if self.top_logprobs is None:
            return None
        entry = logprob_entry(text, len(self.logprobs), self.top_logprobs)
        self.logprobs.append(entry)
        return entry

    def _token_line_with_logprobs(self, text: str, thinking: bool) -> bytes:
        obj: dict[str, Any] = {"model": self.model, "created_at": utc_timestamp()}
        delta = {"content": "", "thinking": text} if thinking else {"content": text}
        if self.chat:
            obj["message"] = {"role": "assistant", **delta}
        else:
            obj["response"] = delta["content"]
            if thinking:
                obj["thinking"] = text
        obj["done"] = False
        obj["logprobs"] = [self.note_logprobs(text)]
        return dumps(obj).encode() + b"\n"

    def tool_calls_line(self, calls: list[dict[str, Any]]) -> bytes:
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        obj = {
            "model": self.model,
            "created_at": utc_timestamp(),
            "message": message,
            "done": False,
        }
        return dumps(obj).encode() + b"\n"

    def final(
        self, reply: Reply, stats: dict[str, int], context: list[int] | None, aggregate: bool
    ) -> dict[str, Any]:
        """The last object of a stream, or the whole reply when ``aggregate`` (non-stream)."""
        obj: dict[str, Any] = {"model": self.model, "created_at": utc_timestamp()}
        thinking = "".join(reply.thinking) if aggregate else ""
        content = "".join(reply.content) if aggregate else ""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if aggregate and reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            obj["message"] = message
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
        obj["done"] = True
        obj["done_reason"] = reply.done_reason
        if context:
            obj["context"] = context
        obj.update(stats)
        if aggregate and self.top_logprobs is not None:
            for text in [*reply.thinking, *reply.content]:
                self.note_logprobs(text)
            obj["logprobs"] = self.logprobs
        return obj


@dataclass
class Delivery:
    """Everything needed to pace and send one reply once its runner slot is held."""

    response: Response
    stream: bool
    encoder: ChunkEncoder
    reply: Reply
    context: list[int] | None
    first_token_s: float
    token_interval_s: float
    fault: FaultPlan
    stats: Stats
    events: EventLog
    request_id: str
    model: str
    start_ns: int
    load_ns: int

    async def run(self) -> None:
        """Generate and send; raises RunnerError for failures before the first byte."""
        loop = asyncio.get_running_loop()
        slot_ns = time.perf_counter_ns()
        if self.first_token_s:
            await asyncio.sleep(self.first_token_s)
        prompt_ns = max(1, time.perf_counter_ns() - slot_ns)
        if self.fault.first_byte_delay_s:
            await asyncio.sleep(self.fault.first_byte_delay_s)
        if self.fault.status is not None:
            raise RunnerError(self.fault.status, self.fault.error)
        if self.fault.crash_after == 0:
            raise RunnerError(500, RUNNER_STOPPED)
        items = self._items()
        crash = self.fault.crash_after if self.fault.crash_after is not None else -1
        crashes = 0 < crash < len(items)
        stall_at = self.fault.stall_after if self.fault.stall_s else -1
        eval_start = time.perf_counter_ns()
        start = loop.time()
        interval = self.token_interval_s
        sent = 0
        total = len(items)
        limit = crash if crashes else total
        while sent < limit:
            if sent == stall_at:
                stall_at = -1
                await asyncio.sleep(self.fault.stall_s)
                start += self.fault.stall_s
            stop = limit if stall_at < sent else min(limit, stall_at)
            if interval:
                wait = start + sent * interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                due = int((loop.time() - start) / interval) + 1
                upto = min(stop, max(sent + 1, due))
            else:
                upto = min(stop, sent + _BATCH_TOKENS)
            if upto <= sent:
                continue
            await self._emit(items, sent, upto)
            sent = upto
            if not interval:
                await asyncio.sleep(0)  # let other streams run
        if crashes:
            self.events.emit(
                "error",
                request_id=self.request_id,
                model=self.model,
                error=RUNNER_STOPPED,
                after_tokens=sent,
            )
            if not self.stream:
                raise RunnerError(500, RUNNER_STOPPED)
            await self.response.write(dumps({"error": RUNNER_STOPPED}).encode() + b"\n")
            await self.response.end()
            return
        if sent == stall_at:  # a stall after the last token still delays the done line
            await asyncio.sleep(self.fault.stall_s)
        eval_ns = max(1, time.perf_counter_ns() - eval_start)
        total_ns = time.perf_counter_ns() - self.start_ns
        numbers = metrics(
            total_ns,
            self.load_ns,
            self.reply.prompt_tokens,
            prompt_ns,
            self.reply.eval_count,
            eval_ns,
        )
        final = self.encoder.final(self.reply, numbers, self.context, aggregate=not self.stream)
        if self.stream:
            await self.response.write(dumps(final).encode() + b"\n")
            await self.response.end()
        else:
            self.response.send(200, dumps(final).encode())
        self.stats.generations_completed += 1
        self.events.emit(
            "done",
            request_id=self.request_id,
            model=self.model,
            done_reason=self.reply.done_reason,
            eval_count=self.reply.eval_count,
        )

    def _items(self) -> list[tuple[str, Any]]:
        items: list[tuple[str, Any]] = [("think", t) for t in self.reply.thinking]
        items += [("text", t) for t in self.reply.content]
        if self.reply.tool_calls:
            items.append(("tools", self.reply.tool_calls))
        return items

    async def _emit(self, items: list[tuple[str, Any]], begin: int, end: int) -> None:
        if begin == 0:
            self.events.emit("first_token", request_id=self.request_id, model=self.model)
        self.stats.tokens_generated += end - begin
        if not self.stream:
            return
        encoder = self.encoder
        lines = []
        for kind, value in items[begin:end]:
            if kind == "tools":
                lines.append(encoder.tool_calls_line(value))
            else:
                lines.append(encoder.token_line(value, kind == "think"))
        await self.response.write(*lines)
