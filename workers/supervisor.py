"""Keep a worker process running: start it again when it dies without being asked to stop.

``python -S workers/supervisor.py -- COMMAND...`` runs COMMAND as a child and forwards SIGTERM
and SIGINT to it. A child that exits on its own with a non-zero status (Celery gives up with
"Unrecoverable error" on some broker failures, e.g. while Redis restarts) is started again after
a backoff. Its unfinished tasks stay unacknowledged in Redis and are delivered again after the
visibility timeout.

It stays as small as a Python process can be: run by path and with ``-S`` (no ``site``, no
installed packages), it imports only a few standard modules (``subprocess``
alone would add 1.5 MiB), about 9 MiB resident in all.

The child runs with ``MALLOC_ARENA_MAX=2`` unless the environment sets it. glibc gives a thread
that finds the heap's lock taken an arena of its own (up to eight per core), and memory freed
in an arena serves that arena only: with a worker's dozen threads, free memory strands in
several arenas and the worker's RSS creeps up under steady work for as long as it has been
measured, while two arenas keep it flat at the same throughput (the soak benchmark,
``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long resets the backoff
MALLOC_ARENA_MAX = "2"  # glibc malloc arenas of the child (see above)


def child_environment(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with glibc's ``MALLOC_ARENA_MAX`` defaulting to ours."""
    return {"MALLOC_ARENA_MAX": MALLOC_ARENA_MAX, **environ}


def supervise(command: list[str]) -> int:
    """Run ``command`` until it exits cleanly or a stop signal arrives; return its status
    (negative: the signal that ended it)."""
    stopping = False
    child: int | None = None  # the running child's pid

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None:
            with contextlib.suppress(ProcessLookupError):  # it has just ended
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    backoff_s = 1.0
    while True:
        started = time.monotonic()
        child = os.posix_spawnp(command[0], command, child_environment(dict(os.environ)))
        status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
        child = None
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
        print("usage: python -S supervisor.py -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
