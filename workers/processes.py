"""A handle on a child process: stop it gently, kill it hard, read its log."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any


class Child:
    """A child process stopped with SIGTERM, then SIGKILL."""

    def __init__(self, process: subprocess.Popen[Any], log_path: Path | None = None) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then after ``timeout_s`` SIGKILL: to the whole process group when the
        child leads one of its own, so that a supervisor killed mid-shutdown leaves no worker
        behind it, still running."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._sigkill()
                self.process.wait(timeout_s)
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, as far as Celery can tell)."""
        if self.alive():
            self._sigkill()
            self.process.wait(15)

    def _sigkill(self) -> None:
        """SIGKILL the child's process group if it leads one of its own, else the child."""
        try:
            if os.getpgid(self.process.pid) == self.process.pid:
                os.killpg(self.process.pid, signal.SIGKILL)
                return
        except ProcessLookupError:
            return  # it ended meanwhile
        self.process.kill()

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""
