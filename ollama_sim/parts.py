"""The shared parts every handler group works with, bundled once."""

from __future__ import annotations

from dataclasses import dataclass

from .config import SimConfig
from .faults import Faults
from .http import Request
from .scheduler import Scheduler
from .stats import EventLog, Stats


@dataclass(frozen=True)
class SimParts:
    config: SimConfig
    scheduler: Scheduler
    stats: Stats
    events: EventLog
    faults: Faults


class Handlers:
    """Base of the handler groups: the parts as attributes."""

    def __init__(self, parts: SimParts) -> None:
        self.parts = parts
        self.config = parts.config
        self.scheduler = parts.scheduler
        self.stats = parts.stats
        self.events = parts.events
        self.faults = parts.faults

    def record_disconnect(self, request: Request, model: str, stage: str) -> None:
        """The client went away while queued, waiting for a slot or generating."""
        self.stats.client_disconnects += 1
        self.events.emit(
            "disconnect",
            request_id=request.request_id,
            model=model,
            stage=stage,
            peer_port=request.peer_port,
        )
