"""Daemon threads kept for the next job, so that a task's helper thread costs no thread start.

``Thread.start()`` returns only once the new thread runs, and on a busy host the scheduler may
take milliseconds to run it: a delay paid on the way to each task's first event. Here a thread
whose job has ended waits for the next one, and handing a job to it is a queue put.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable

Job = Callable[[], None]


class SpareThreads:
    """Runs each job in a daemon thread of its own, reusing those whose job has ended.

    A job that raises ends its thread, as it would a thread started for it alone.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a child has none of these threads

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Job, str]] = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job

    @property
    def idle(self) -> int:
        """Threads waiting for a job."""
        return self._idle

    def run(self, job: Job, name: str) -> None:
        """Start ``job`` in a thread named ``name``; return at once if one is idle."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((job, name))
                return
        threading.Thread(target=self._serve, args=(job,), name=name, daemon=True).start()

    def _serve(self, job: Job) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            job, name = self._jobs.get()
            threading.current_thread().name = name


spare_threads = SpareThreads()  # this process's, shared by every stream and task
