"""The OpenAI request formats: bodies, their conversion to tasks, and results as OpenAI replies.

One copy for every way in: the gateway's ``/v1/chat/completions`` and ``/v1/completions`` routes
and the lines of a batch.
"""

from tasks.openai.bodies import ChatMessage, ChatRequest, CompletionRequest
from tasks.openai.replies import chat_completion, text_completion, tool_calls, usage
from tasks.openai.requests import chat_task, completion_task

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "chat_completion",
    "chat_task",
    "completion_task",
    "text_completion",
    "tool_calls",
    "usage",
]
