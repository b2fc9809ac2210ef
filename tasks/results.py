"""Result models: what a finished task leaves in the result backend and in its ``done`` event.

The parts every kind shares live here; each kind's own result model lives in its module under
``tasks/kinds/`` (and stays importable from here by its name, e.g. ``GenerateResult``).
"""

from __future__ import annotations

from typing import Any

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


def parse_result(data: dict[str, Any]) -> TaskResult:
    """Rebuild the typed result from its JSON form."""
    from tasks.kinds import registry  # imported here: the kinds' modules import this one

    kind = registry.find(str(data.get("kind")))
    model = kind.result if kind is not None else TaskResult
    return model.model_validate(data)


def __getattr__(name: str) -> Any:
    """Each kind's result model by its name, as this module exported them."""
    if not name.startswith("__"):
        from tasks.kinds import registry

        for kind in registry:
            if kind.result.__name__ == name:
                return kind.result
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
