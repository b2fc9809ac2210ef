"""The chaos run: a short version in the default suite, the full one with `make chaos`.

Every failure a chaos run has found also has a deterministic test of its own
(test_reliability.py, test_redis_restart.py), so that a fix is proven, not just not seen again.
"""

from __future__ import annotations

import pytest

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
