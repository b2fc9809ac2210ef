"""The benchmarks command runs end to end (tiny counts). No speed is asserted, ever."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("overhead", "stream")


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_benchmarks_write_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", *SCENARIOS, "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"date", "quick", "machine", "scenarios"} <= set(results)
    assert results["quick"] is True
    assert results["machine"]["cpus"] >= 1
    assert set(results["scenarios"]) == set(SCENARIOS)
    for name, scenario in results["scenarios"].items():
        assert "error" not in scenario, scenario.get("error")
        metrics = scenario["metrics"]
        assert metrics, f"{name} recorded nothing"
        assert any(m["kind"] == "ratio" for m in metrics.values()), f"{name} has no ratio"
        for metric, summary in metrics.items():
            assert {"unit", "kind", "median", "min", "max", "values"} <= set(summary)
            assert summary["values"], f"{name}/{metric} has no values"
            for value in (summary["median"], summary["min"], summary["max"], *summary["values"]):
                assert math.isfinite(value), f"{name}/{metric}: {value}"
                if summary["kind"] != "difference":
                    assert value > 0, f"{name}/{metric}: {value}"
    assert "overhead" in run.stdout and "corral/direct p50" in run.stdout


def test_scenarios_are_listed() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--list"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    names = {line.split()[0] for line in run.stdout.splitlines() if line.strip()}
    assert {"overhead", "throughput", "stream", "saturation", "mixed_models", "memory"} <= names
