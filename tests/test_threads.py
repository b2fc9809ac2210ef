"""Spare threads: a job goes to a thread whose job has ended, in this process and after a fork."""

from __future__ import annotations

import os
import threading
import time

from workers.threads import SpareThreads

WAIT_S = 10.0


def wait_idle(spare: SpareThreads, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while spare.idle != count:
        assert time.monotonic() < deadline, f"{spare.idle} idle threads, not {count}"
        time.sleep(0.001)


def test_a_thread_whose_job_ended_runs_the_next_one_under_its_name() -> None:
    spare = SpareThreads()
    seen: list[tuple[int, str]] = []
    ran = threading.Event()

    def job() -> None:
        seen.append((threading.get_ident(), threading.current_thread().name))
        ran.set()

    spare.run(job, "first")
    assert ran.wait(WAIT_S)
    wait_idle(spare, 1)
    ran.clear()
    spare.run(job, "second")
    assert ran.wait(WAIT_S)
    assert seen[1] == (seen[0][0], "second")
    wait_idle(spare, 1)


def test_jobs_that_overlap_get_threads_of_their_own() -> None:
    spare = SpareThreads()
    release = threading.Event()
    started = threading.Barrier(3, timeout=WAIT_S)  # two jobs and this test

    def job() -> None:
        started.wait()
        release.wait(WAIT_S)

    spare.run(job, "a")
    spare.run(job, "b")
    started.wait()  # both run at once: neither waited for the other
    release.set()
    wait_idle(spare, 2)


def test_a_forked_child_starts_threads_of_its_own() -> None:
    spare = SpareThreads()
    done = threading.Event()
    spare.run(done.set, "parent")
    assert done.wait(WAIT_S)
    wait_idle(spare, 1)  # the parent's thread waits; a child does not have it
    pid = os.fork()
    if pid == 0:
        ran = threading.Event()
        spare.run(ran.set, "child")
        os._exit(0 if ran.wait(WAIT_S) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
