"""The OpenAI request formats: bodies, their conversion to tasks, and results as OpenAI replies.

One copy for every way in: the gateway's ``/v1/chat/completions`` and ``/v1/completions`` routes
and the lines of a batch.
"""

from tasks.openai.bodies import ChatMessage, ChatRequest, CompletionRequest, EmbeddingRequest
from tasks.openai.replies import (
    chat_completion,
    embedding_list,
    text_completion,
    tool_calls,
    usage,
)
from tasks.openai.requests import chat_task, completion_task, embedding_task

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "chat_completion",
    "chat_task",
    "completion_task",
    "embedding_list",
    "embedding_task",
    "text_completion",
    "tool_calls",
    "usage",
]
