"""The submitting side: the Python SDK (``Client``, ``Job``, ``Conversation``) and the CLI."""

from producers.batches import Batch
from producers.client import Client
from producers.conversation import Conversation
from producers.jobs import Cancellation, Job, Restart
from producers.unserved import UnservedModelWarning
from tasks.errors import (
    BrokerUnavailable,
    CapabilityError,
    CorralError,
    InvalidRequest,
    InvalidSetting,
    ModelNotFound,
    OllamaOverloaded,
    OllamaRequestError,
    OllamaRunnerError,
    OllamaUnavailable,
    PermanentError,
    QueueFull,
    RetryableError,
    StructuredOutputError,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
)

__all__ = [
    "Batch",
    "BrokerUnavailable",
    "Cancellation",
    "CapabilityError",
    "Client",
    "Conversation",
    "CorralError",
    "InvalidRequest",
    "InvalidSetting",
    "Job",
    "ModelNotFound",
    "OllamaOverloaded",
    "OllamaRequestError",
    "OllamaRunnerError",
    "OllamaUnavailable",
    "PermanentError",
    "QueueFull",
    "Restart",
    "RetryableError",
    "StructuredOutputError",
    "TaskCancelled",
    "TaskNotFound",
    "TaskTimeout",
    "UnservedModelWarning",
]
