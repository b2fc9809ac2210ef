"""The worker's exit status and the supervisor that acts on it.

A worker that dies of Celery's "Unrecoverable error" (seen while Redis restarts) must exit
non-zero, so that the supervisor starts it again; a worker asked to stop must exit 0, and stay
stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from producers.cli.local_stack import start_worker
from workers import supervisor

SUPERVISOR = [sys.executable, "-S", supervisor.__file__, "--"]  # as corral worker runs it


def test_an_unrecoverable_error_gives_a_failing_exit_status(redis_url: str) -> None:
    script = textwrap.dedent(f"""
        import sys
        from celery import bootsteps
        from tasks.app import create_app
        from tasks.settings import load_settings
        from workers.launcher import WorkerOptions, run_worker

        class Explode(bootsteps.StartStopStep):
            def start(self, worker):
                raise RuntimeError("a step failed")

        app = create_app(load_settings(redis_url={redis_url!r}))
        app.steps["worker"].add(Explode)
        sys.exit(run_worker(app, WorkerOptions(queues=("corral.x",), loglevel="WARNING")))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert "Unrecoverable error" in done.stderr + done.stdout
    assert done.returncode == 1


def test_a_worker_asked_to_stop_exits_0(redis_url: str, sim_url: str, tmp_path: Path) -> None:
    child = start_worker(
        ["unserved-stop"],
        redis_url=redis_url,
        ollama_host=sim_url,
        log_path=tmp_path / "worker.log",
    )
    child.stop()
    assert child.process.returncode == 0, child.log_tail()


def test_the_supervisor_restarts_a_failed_child_until_it_exits_cleanly(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = (
        f"import pathlib, sys; p = pathlib.Path({str(runs)!r}); "
        "n = len(p.read_text()) if p.exists() else 0; p.write_text('x' * (n + 1)); "
        "sys.exit(3 if n == 0 else 0)"
    )
    done = subprocess.run(
        [*SUPERVISOR, sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    assert runs.read_text() == "xx"
    assert "worker exited with status 3; starting it again" in done.stderr


def test_the_supervisor_forwards_sigterm_and_does_not_restart() -> None:
    script = (
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        "print('ready', flush=True); time.sleep(60)"
    )
    with subprocess.Popen(
        [*SUPERVISOR, sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert process.stdout.read() == ""  # not started a second time


def test_the_worker_runs_with_two_malloc_arenas_unless_the_environment_says_otherwise() -> None:
    script = "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    for value, expected in ((None, "2"), ("4", "4")):
        child_env = env if value is None else {**env, "MALLOC_ARENA_MAX": value}
        done = subprocess.run(
            [*SUPERVISOR, sys.executable, "-c", script],
            env=child_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{expected}\n"
