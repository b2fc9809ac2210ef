"""Result models: what a finished task leaves in the result backend and in its ``done`` event."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

METRIC_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


class OllamaMetrics(BaseModel):
    """Ollama's own figures from the final chunk (durations in nanoseconds, as Ollama sends)."""

    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if self.eval_count and self.eval_duration:
            return self.eval_count / (self.eval_duration / 1e9)
        return None


class Timings(BaseModel):
    """Our own clock readings (Unix seconds) and the spans derived from them."""

    enqueued_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def queue_wait_s(self) -> float | None:
        if self.enqueued_at is None or self.started_at is None:
            return None
        return max(0.0, self.started_at - self.enqueued_at)

    @property
    def time_to_first_token_s(self) -> float | None:
        if self.first_token_at is None or self.enqueued_at is None:
            return None
        return max(0.0, self.first_token_at - self.enqueued_at)

    @property
    def total_s(self) -> float | None:
        if self.finished_at is None or self.enqueued_at is None:
            return None
        return max(0.0, self.finished_at - self.enqueued_at)


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class TaskResult(BaseModel):
    """Common part of every result."""

    task_id: str
    kind: str
    model: str
    done_reason: str | None = None
    metrics: OllamaMetrics = Field(default_factory=OllamaMetrics)
    timings: Timings = Field(default_factory=Timings)
    worker: str | None = None
    ollama_host: str | None = None
    attempts: int = 1


class GenerateResult(TaskResult):
    kind: Literal["generate"] = "generate"
    text: str
    thinking: str | None = None
    context: list[int] | None = None  # Ollama's token ids, to pass back as ``context``


class ChatResult(TaskResult):
    kind: Literal["chat"] = "chat"
    message: AssistantMessage

    @property
    def text(self) -> str:
        return self.message.content


class StructuredResult(TaskResult):
    kind: Literal["structured"] = "structured"
    data: Any
    raw_text: str


class MultimodalResult(TaskResult):
    kind: Literal["multimodal"] = "multimodal"
    text: str


RESULT_MODELS: dict[str, type[TaskResult]] = {
    "generate": GenerateResult,
    "chat": ChatResult,
    "structured": StructuredResult,
    "multimodal": MultimodalResult,
}


def parse_result(data: dict[str, Any]) -> TaskResult:
    """Rebuild the typed result from its JSON form."""
    model = RESULT_MODELS.get(str(data.get("kind")), TaskResult)
    return model.model_validate(data)
