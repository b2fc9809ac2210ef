"""What runs inside a worker: the Ollama client, stream publishing, the embedded Redis, errors.

Nothing here knows corral's queue or key names; the tasks hand in what is needed.
"""

from workers.errors import (
    BrokerUnavailable,
    CapabilityError,
    CorralError,
    InvalidRequest,
    ModelNotFound,
    OllamaOverloaded,
    OllamaRequestError,
    OllamaRunnerError,
    OllamaUnavailable,
    PermanentError,
    RetryableError,
    StructuredOutputError,
    TaskCancelled,
    TaskNotFound,
    TaskTimeout,
)
from workers.ollama_client import OllamaClient, OllamaConfig, parse_host
from workers.stream import StreamPublisher

__all__ = [
    "BrokerUnavailable",
    "CapabilityError",
    "CorralError",
    "InvalidRequest",
    "ModelNotFound",
    "OllamaClient",
    "OllamaConfig",
    "OllamaOverloaded",
    "OllamaRequestError",
    "OllamaRunnerError",
    "OllamaUnavailable",
    "PermanentError",
    "RetryableError",
    "StreamPublisher",
    "StructuredOutputError",
    "TaskCancelled",
    "TaskNotFound",
    "TaskTimeout",
    "parse_host",
]
