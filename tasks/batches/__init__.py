"""Batches: a JSONL file of requests in, an output and an error file out (docs/batches.md).

- ``lines``: reading and checking the input, one line at a time
- ``files``: the input file and its content-derived id
- ``records``: the batch's record, status and counters in Redis; each owner's list
- ``output``: output and error lines in OpenAI's Batch API format
- ``store``: where they are written (Redis or files), once each, by one writer at a time
- ``collector``: following the batch's tasks to their outcomes, expiry, the final status
"""

from tasks.batches.collector import Collector, cancel_tasks, open_task_ids
from tasks.batches.files import InputFile, describe, lines_of, spool
from tasks.batches.lines import URLS, Line, Rejected, read_lines
from tasks.batches.records import (
    CANCELLING,
    DEFAULT_PRIORITY,
    STORE_FILE,
    STORE_REDIS,
    TERMINAL,
    VALIDATING,
    BatchInfo,
    Records,
    create,
    list_ids,
    load,
)
from tasks.batches.store import ERRORS, OUTPUT, parse
from tasks.batches.store import read_lines as read_output

__all__ = [
    "CANCELLING",
    "DEFAULT_PRIORITY",
    "ERRORS",
    "OUTPUT",
    "STORE_FILE",
    "STORE_REDIS",
    "TERMINAL",
    "URLS",
    "VALIDATING",
    "BatchInfo",
    "Collector",
    "InputFile",
    "Line",
    "Records",
    "Rejected",
    "cancel_tasks",
    "create",
    "describe",
    "lines_of",
    "list_ids",
    "load",
    "open_task_ids",
    "parse",
    "read_lines",
    "read_output",
    "spool",
]
