"""Chaos runs, with `make chaos` (`pytest -m chaos`): random kills, so not in the default suite.

Each failure a chaos run found has a deterministic test of its own in the default suite
(test_reliability.py, test_redis_restart.py).
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


@pytest.mark.chaos
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
