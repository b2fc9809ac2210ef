"""The registry of task kinds. Adding a kind: write its module (see ``generate.py``), then add it
to :class:`KindMethods` and to the registrations below; nothing else changes.

Everything per kind is derived from here: the Celery tasks (``tasks.definitions``), the SDK's
methods (``producers.Client`` inherits :class:`KindMethods`), ``corral submit <kind>``, the
gateway's ``POST /v1/tasks/<kind>`` and the payload schemas in its OpenAPI document.
"""

from __future__ import annotations

from tasks.kinds import chat, embed, generate, multimodal, structured
from tasks.kinds.base import Registry, TaskKind


class KindMethods:
    """One SDK method per kind, inherited by ``producers.Client``.

    Spelled out so that type checkers see each method's signature; a kind registered later
    gets its method from :meth:`Registry.register`.
    """

    generate = generate.generate
    chat = chat.chat
    structured = structured.structured
    multimodal = multimodal.multimodal
    embed = embed.embed


registry = Registry(methods=KindMethods)
registry.register(generate.KIND)
registry.register(chat.KIND)
registry.register(structured.KIND)
registry.register(multimodal.KIND)
registry.register(embed.KIND)

# The built-in kinds, as these names were exported before the registry (a snapshot: a kind
# registered later is in ``registry``, not here).
KINDS: tuple[str, ...] = registry.names()
TASK_NAMES: dict[str, str] = {kind.name: kind.task_name for kind in registry}

__all__ = ["KINDS", "TASK_NAMES", "KindMethods", "Registry", "TaskKind", "registry"]
