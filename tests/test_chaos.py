"""The chaos runs: short versions in the default suite, the full ones with `make chaos`.

Every failure a chaos run has found also has a deterministic test of its own
(test_reliability.py, test_redis_restart.py, test_batches.py), so that a fix is proven, not
just not seen again.
"""

from __future__ import annotations

import pytest

from tests.batch_chaos import FULL_PLAN, SHORT_PLAN, BatchChaosReport, BatchChaosRun
from tests.chaos import ChaosRun


def check(report) -> None:  # noqa: ANN001
    print("\n" + report.summary())
    assert report.lost == 0
    assert report.duplicated == 0
    assert report.missing_terminal == 0
    assert report.unexpected_errors == []


@pytest.mark.slow
def test_chaos_short(tmp_path) -> None:
    report = ChaosRun(tmp_path, tasks=60, kills=2).run()
    check(report)
    assert report.kills == 2 and report.redis_restarts == 1


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_chaos_full(tmp_path) -> None:
    report = ChaosRun(tmp_path, tasks=500, kills=6).run()
    check(report)
    assert report.kills == 6 and report.redis_restarts == 1


def check_batch(report: BatchChaosReport) -> None:
    """Each line once in the output and error lines, as it should have ended; the counts and
    the output file agree with them; a line ran twice only after the worker running it died."""
    print("\n" + report.summary())
    assert report.status == "completed"
    seen = iter(("validating", "in_progress", "finalizing", "completed"))
    assert all(status in seen for status in report.statuses), report.statuses  # never back
    assert report.lost == [] and report.doubled == [] and report.wrong == []
    total, completed, failed = report.counts
    assert total == report.lines and completed + failed == total
    assert report.file_lines == completed
    assert report.ran_twice == [] and report.bad_streams == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_batch_chaos_short(tmp_path) -> None:
    report = BatchChaosRun(tmp_path, lines=80, plan=SHORT_PLAN, workers=3, replace=False).run()
    check_batch(report)
    assert report.actions == {"kill_submitter": 1, "kill_worker": 2, "restart_redis": 1}


@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_batch_chaos_full(tmp_path) -> None:
    report = BatchChaosRun(tmp_path, lines=800, plan=FULL_PLAN, workers=3, replace=True).run()
    check_batch(report)
    assert sum(report.actions.values()) == len(FULL_PLAN)
    assert report.ran_again > 0  # the kills hit running lines
    assert report.follower_exits.count(0) >= 1  # the follower stopped mid-batch ended well
