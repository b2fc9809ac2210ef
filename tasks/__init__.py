"""The contract: Celery app and configuration, queue names, the task kinds (``tasks/kinds/``)
with their payload and result models, and the tasks."""

from tasks.app import celery_config, create_app
from tasks.keys import canonical_model, queue_name
from tasks.kinds import KINDS, TASK_NAMES, registry
from tasks.kinds.chat import ChatPayload, ChatResult
from tasks.kinds.embed import EmbedPayload, EmbedResult
from tasks.kinds.generate import GeneratePayload, GenerateResult
from tasks.kinds.multimodal import MultimodalPayload, MultimodalResult
from tasks.kinds.structured import StructuredPayload, StructuredResult
from tasks.payloads import Message, validate_payload
from tasks.results import TaskResult, parse_result
from tasks.settings import Settings, load_settings

__all__ = [
    "KINDS",
    "TASK_NAMES",
    "ChatPayload",
    "ChatResult",
    "EmbedPayload",
    "EmbedResult",
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
    "registry",
    "validate_payload",
]
