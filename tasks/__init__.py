"""The contract: Celery app and configuration, queue names, payload and result models, tasks."""

from tasks.app import celery_config, create_app
from tasks.keys import TASK_NAMES, canonical_model, queue_name
from tasks.payloads import (
    KINDS,
    ChatPayload,
    GeneratePayload,
    Message,
    MultimodalPayload,
    StructuredPayload,
    validate_payload,
)
from tasks.results import (
    ChatResult,
    GenerateResult,
    MultimodalResult,
    StructuredResult,
    TaskResult,
    parse_result,
)
from tasks.settings import Settings, load_settings

__all__ = [
    "KINDS",
    "TASK_NAMES",
    "ChatPayload",
    "ChatResult",
    "GeneratePayload",
    "GenerateResult",
    "Message",
    "MultimodalPayload",
    "MultimodalResult",
    "Settings",
    "StructuredPayload",
    "StructuredResult",
    "TaskResult",
    "canonical_model",
    "celery_config",
    "create_app",
    "load_settings",
    "parse_result",
    "queue_name",
    "validate_payload",
]
