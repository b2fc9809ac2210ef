"""Keep a worker process running: start it again when it dies without being asked to stop.

``python workers/supervisor.py -- COMMAND...`` runs COMMAND as a child and forwards SIGTERM and
SIGINT to it. A child that exits on its own with a non-zero status (Celery gives up with
"Unrecoverable error" on some broker failures, e.g. while Redis restarts) is started again after
a backoff. Its unfinished tasks stay unacknowledged in Redis and are delivered again after the
visibility timeout. It imports only the standard library and is run by path, so it costs a few
MiB.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long resets the backoff


def supervise(command: list[str]) -> int:
    """Run ``command`` until it exits cleanly or a stop signal arrives; return its status."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff_s = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        status = child.wait()
        if stopping or status == 0:
            return status
        if time.monotonic() - started > STABLE_AFTER_S:
            backoff_s = 1.0
        print(
            f"worker exited with status {status}; starting it again in {backoff_s:g} s",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + backoff_s
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            return status
        backoff_s = min(MAX_BACKOFF_S, backoff_s * 2)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python supervisor.py -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
