"""``python -m benchmarks [SCENARIO ...] [--quick] [--json PATH] [--plot] [--minutes N]``

Starts a real Redis, then for each scenario the simulator and workers it needs, runs it, stops
everything it started, prints a table and writes JSON (default
``benchmarks/results/<date>.json``) and, with ``--plot``, one PNG chart per scenario beside it
(``--plot-from FILE.json`` draws them again from a saved run). Every figure is a ratio or a
difference against a baseline measured in the same run, interleaved with it; medians and
min/max are over repeats.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.registry import Scenario, load_scenarios
from benchmarks.report import machine, table, write_json
from benchmarks.stack import Context
from benchmarks.stats import Metrics
from workers.embedded_redis import EmbeddedRedis

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The simulator reads these as defaults; a scenario must get exactly the settings it asks for.
_SIM_ENV = (
    "OLLAMA_NUM_PARALLEL",
    "OLLAMA_MAX_LOADED_MODELS",
    "OLLAMA_MAX_QUEUE",
    "OLLAMA_KEEP_ALIVE",
    "OLLAMA_HOST",
)


def parse_args(argv: list[str] | None, names: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"what to run (default: all but soak): {', '.join(names)}",
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts, for CI smoke runs")
    parser.add_argument("--repeats", type=int, help="override every scenario's repeat count")
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument(
        "--minutes", type=float, help="how long a timed scenario (soak) runs; default: its own"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--plot", action="store_true", help="also write one PNG chart per scenario beside the JSON"
    )
    parser.add_argument(
        "--plot-from",
        type=Path,
        metavar="FILE.json",
        help="draw the charts of a saved run beside it, without running anything",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(names))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(names)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be positive")
    return args


def select(available: list[Scenario], names: list[str]) -> list[Scenario]:
    """The scenarios named, or without names every default one (a soak only when named)."""
    return [s for s in available if s.name in names or (not names and s.default)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    available = load_scenarios()
    args = parse_args(argv, [s.name for s in available])
    if args.plot_from is not None:
        plot(json.loads(args.plot_from.read_text()), args.plot_from)
        return 0
    if args.list:
        for s in available:
            named_only = "" if s.default else " (only when named)"
            print(f"{s.name:14} {s.summary}{named_only}")
        return 0
    chosen = select(available, args.scenarios)
    for name in _SIM_ENV:
        os.environ.pop(name, None)
    # SIGTERM unwinds like Ctrl-C, so every process this run started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    now = dt.datetime.now(dt.UTC)
    results: dict[str, Any] = {
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine(),
        "scenarios": {},
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp, EmbeddedRedis() as server:
        ctx = Context(
            server,
            Path(tmp),
            quick=args.quick,
            repeats=args.repeats,
            log=log,
            minutes=args.minutes,
        )
        for s in chosen:
            log(f"{s.name}: {s.summary}")
            metrics = Metrics()
            started = time.monotonic()
            entry: dict[str, Any] = {"summary": s.summary}
            try:
                with ctx.scope():
                    s.run(ctx, metrics)
            except Exception as exc:  # report it, run the other scenarios, exit non-zero
                failed = True
                traceback.print_exc()
                entry["error"] = f"{type(exc).__name__}: {exc}"
            entry.update(
                duration_s=round(time.monotonic() - started, 2),
                metrics=metrics.summary(),
                notes=metrics.notes,
            )
            if metrics.curves:
                entry["curves"] = metrics.curves
            results["scenarios"][s.name] = entry
            log(f"{s.name}: done in {entry['duration_s']:.1f} s")
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = args.json or RESULTS_DIR / f"{now:%Y-%m-%d}.json"
    write_json(results, path)
    print(table(results))
    print(f"\nJSON: {path}")
    if args.plot:
        plot(results, path)
    return 1 if failed else 0


def plot(results: dict[str, Any], json_path: Path) -> None:
    from benchmarks.plot import plot_results  # matplotlib is loaded only when asked for

    for png in plot_results(results, json_path):
        print(f"chart: {png}")


if __name__ == "__main__":
    sys.exit(main())
