"""The benchmarks command runs end to end (tiny counts). No speed is asserted, ever."""

from __future__ import annotations

import json
import math
import struct
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
    expected = {"overhead", "throughput", "stream", "saturation", "mixed_models", "memory"}
    assert expected | {"many_streams", "scale"} <= names


def summary(kind: str, unit: str, values: list[float]) -> dict[str, object]:
    ordered = sorted(values)
    return {
        "unit": unit,
        "kind": kind,
        "median": ordered[len(ordered) // 2],
        "min": ordered[0],
        "max": ordered[-1],
        "values": values,
    }


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return width, height


def test_plot_from_saved_json_writes_one_png_per_scenario(tmp_path: Path) -> None:
    saved = tmp_path / "run.json"
    results = {
        "date": "2026-11-30T12:00:00+00:00",
        "quick": True,
        "machine": {"cpus": 2},
        "scenarios": {
            "overhead": {
                "summary": "one task at a time",
                "metrics": {
                    "corral p50": summary("value", "ms", [5.9, 5.6, 6.2]),
                    "bare p50": summary("baseline", "ms", [4.0, 3.9, 4.1]),
                    "corral - bare p50": summary("difference", "ms", [1.9, 1.7, 2.1]),
                    "corral/bare p50": summary("ratio", "x", [1.48, 1.42, 1.53]),
                },
                "notes": [],
            },
            "scale": {
                "summary": "cost as the backlog grows",
                "metrics": {
                    "start p50 @ 100": summary("value", "ms", [3.0, 2.8]),
                    "start p50 @ 10000": summary("value", "ms", [3.2, 3.1]),
                    "start/base p50": summary("ratio", "x", [1.05, 1.1]),
                },
                "curves": {
                    "submit to start": {
                        "x_label": "tasks pending",
                        "unit": "ms",
                        "log_x": True,
                        "series": {
                            "1 model": [[100, "start p50 @ 100"], [10000, "start p50 @ 10000"]]
                        },
                    }
                },
                "notes": [],
            },
            "broken": {"summary": "failed", "error": "RuntimeError: no", "metrics": {}},
        },
    }
    saved.write_text(json.dumps(results))
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--plot-from", str(saved)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    charts = sorted(p.name for p in tmp_path.glob("*.png"))
    assert charts == ["run.overhead.png", "run.scale.png"]
    for name in charts:
        width, height = png_size(tmp_path / name)
        assert width >= 600 and height >= 200, (name, width, height)
        assert f"chart: {tmp_path / name}" in run.stdout


def test_soak_runs_only_when_named() -> None:
    from benchmarks.__main__ import select
    from benchmarks.registry import load_scenarios

    available = load_scenarios()
    assert "soak" not in {s.name for s in select(available, [])}
    assert "overhead" in {s.name for s in select(available, [])}
    assert [s.name for s in select(available, ["soak"])] == ["soak"]


def test_trend_finds_a_slope_and_its_noise() -> None:
    from benchmarks.stats import trend

    minutes = [i / 12 for i in range(120)]  # every 5 s for 10 minutes
    wobble = [0.4 * (-1) ** i for i in range(120)]
    growing = trend(minutes, [100 + 2.0 * m + w for m, w in zip(minutes, wobble, strict=True)])
    assert abs(growing.slope - 2.0) < 2 * growing.stderr + 0.01
    assert 0.35 < growing.residual_sd < 0.45
    flat = trend(minutes, [100 + w for w in wobble])
    assert abs(flat.slope) <= 2 * flat.stderr
    assert math.isnan(trend([0, 1], [1, 2]).slope)


def test_trend_noise_allows_for_neighbours_that_move_together() -> None:
    from benchmarks.stats import trend

    minutes = [5.5 + i for i in range(15)]  # one-minute means after a five-minute warm-up
    # A flat series that swells up and back down once: each mean is close to the one before.
    swell = [100 + 0.5 * math.sin(2 * math.pi * i / 15) + 0.05 * (-1) ** i for i in range(15)]
    line = trend(minutes, swell)
    assert line.lag1 > 0.3
    assert abs(line.slope) > 2 * line.plain_stderr  # as if the means were independent
    assert abs(line.slope) <= 2 * line.stderr
    steady = [100 + 0.3 * m + 0.05 * (-1) ** i for i, m in enumerate(minutes)]
    growth = trend(minutes, steady)
    assert growth.stderr == growth.plain_stderr  # alternating residuals: nothing to widen
    assert abs(growth.slope - 0.3) < 0.01 and growth.slope > 2 * growth.stderr


def profile_lines(module: str, *argv: str, timeout_s: float) -> list[str]:
    """What ``python -m benchmarks.<module>`` printed, once it exited 0."""
    run = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_worker_profile_counts_per_task() -> None:
    argv = ["corral", "--seconds", "2", "--warm-up", "1", "--in-flight", "20"]
    lines = profile_lines("worker_profile", *argv, timeout_s=80)
    assert lines[0].startswith("corral: ") and " tasks in " in lines[0]
    assert lines[1].startswith("worker CPU per task: user ")
    threads = [line for line in lines if line.startswith("  ") and " + " in line]
    assert any(line.strip().startswith("all threads") for line in threads)
    commands = next(line for line in lines if line.startswith("Redis commands per task: "))
    assert float(commands.split(": ")[1]) > 10  # a task's scripts alone run more than that
    assert any("evalsha" in line for line in lines)
    server = next(line for line in lines if line.startswith("redis-server CPU per task: "))
    assert float(server.split(": ")[1].split()[0]) > 0
    timed = lines[lines.index(next(ln for ln in lines if ln.startswith("Redis time per task"))) + 1]
    assert "evalsha " in timed  # the scripts' time, by name


def test_a_monitor_line_is_parsed_back_into_its_arguments() -> None:
    from benchmarks.script_profile import parse_monitor_line

    line = '1796101306.7713 [0 127.0.0.1:56464] "HSET" "k" "a \\"b\\"\\\\" "\\x00\\xff" "\\n"'
    assert parse_monitor_line(line) == (
        "127.0.0.1:56464",
        [b"HSET", b"k", b'a "b"\\', b"\x00\xff", b"\n"],
    )
    assert parse_monitor_line('1796101306.7714 [0 lua] "GET" "k"') == ("lua", [b"GET", b"k"])
    assert parse_monitor_line("OK") is None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_script_profile_names_each_script_of_a_task() -> None:
    lines = profile_lines("script_profile", "--tasks", "10", timeout_s=110)
    assert lines[0].startswith("10 tasks, one at a time: Redis time per task ")
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    for script in ("lua.ADMIT_AND_RELEASE", "lifecycle._BEGIN_FIRST", "lifecycle._END"):
        calls, per_call, in_commands = (float(x) for x in rows[script])
        assert calls == 1.0  # one each per task
        assert 0 < in_commands < per_call
    assert "stream.WRITE_SCRIPT" in rows
    assert not any("not in Redis" in line for line in lines)
