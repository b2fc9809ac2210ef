"""Multi-turn chat that keeps its own history (the seed's global list, done per conversation)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from producers.jobs import Job, Restart
from tasks.kinds.chat import ChatResult
from tasks.results import TaskResult

if TYPE_CHECKING:
    from producers.client import Client


class Conversation:
    """``conv.ask("...")`` sends the history plus the question; the reply joins the history."""

    def __init__(self, client: Client, model: str, *, system: str | None = None) -> None:
        self.client = client
        self.model = model
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def submit(self, content: str, **chat_options: Any) -> Job:
        """Send the history plus ``content``; call :meth:`remember` with the job's result."""
        return self.client.chat(
            self.model, [*self.messages, {"role": "user", "content": content}], **chat_options
        )

    def ask(self, content: str, *, timeout: float | None = None, **chat_options: Any) -> str:
        """Ask and wait for the whole answer, which is returned and kept in the history."""
        job = self.submit(content, **chat_options)
        return self.remember(content, job.result(timeout=timeout))

    def ask_streaming(self, content: str, **chat_options: Any) -> Iterator[str]:
        """Yield the answer's text as it is generated; it joins the history once complete."""
        job = self.submit(content, **chat_options)
        yield from job.text_stream()
        self.remember(content, job.result())

    def ask_events(self, content: str, **chat_options: Any) -> Iterator[dict[str, Any]]:
        """Yield every stream event (thinking included); the answer joins the history."""
        job = self.submit(content, **chat_options)
        yield from job.stream()
        self.remember(content, job.result())

    def remember(self, question: str, result: TaskResult) -> str:
        """Add a question and the assistant's reply to the history; return the reply text."""
        if not isinstance(result, ChatResult):
            raise TypeError(f"expected a chat result, got {type(result).__name__}")
        self._remember(question, result.message.model_dump(exclude_none=True))
        return result.message.content

    def _remember(self, question: str, answer: dict[str, Any]) -> None:
        self.messages.append({"role": "user", "content": question})
        self.messages.append(answer)


__all__ = ["Conversation", "Restart"]
