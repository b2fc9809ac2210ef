"""The scheduler: corral, not list order, decides which task a free slot runs next.

Producers admit tasks into pending structures in Redis; a release step moves the next ones onto
the model's Celery queue when slots free. The design, and what is wired so far, is in
docs/scheduling.md.
"""

from tasks.scheduler.messages import MessageBuilder, ReadyMessage
from tasks.scheduler.pending import (
    DEFAULT_PRIORITY,
    DEFAULT_TENANT,
    MAX_PRIORITY,
    UNITS_HEADER,
    Admission,
    AdmitStep,
    Backlog,
    HostRelease,
    HostState,
    Scheduler,
    Served,
    backlog_commands,
    check_priority,
    check_tenant,
    check_weight,
    estimate_start_s,
)

__all__ = [
    "DEFAULT_PRIORITY",
    "DEFAULT_TENANT",
    "MAX_PRIORITY",
    "UNITS_HEADER",
    "Admission",
    "AdmitStep",
    "Backlog",
    "HostRelease",
    "HostState",
    "MessageBuilder",
    "ReadyMessage",
    "Scheduler",
    "Served",
    "backlog_commands",
    "check_priority",
    "check_tenant",
    "check_weight",
    "estimate_start_s",
]
