"""Command line: ``python -m ollama_sim --host 127.0.0.1 --port 0 [options]``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from .config import ConfigError, SimConfig, apply_env, keep_alive_from_json, load_file, validate
from .faults import FaultConfigError
from .faults import validate as validate_faults
from .server import Simulator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ollama_sim", description="A simulator of the Ollama HTTP API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--config", metavar="FILE", help="JSON settings and model catalogue")
    sched = parser.add_argument_group("scheduling (defaults from OLLAMA_* variables)")
    sched.add_argument("--num-parallel", type=int, help="slots per loaded model (default 1)")
    sched.add_argument("--max-queue", type=int, help="pending load queue size (default 512)")
    sched.add_argument("--max-loaded-models", type=int, help="resident models (default 3)")
    sched.add_argument("--keep-alive", help="idle time before unload, e.g. 5m, 30, -1")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--no-delay", action="store_true", help="zero every simulated delay")
    timing.add_argument("--speed", type=float, help="multiply every simulated delay")
    timing.add_argument("--seed", type=int, help="seed for output and fault draws")
    timing.add_argument("--load-seconds", type=float, help="load time of every model")
    timing.add_argument("--tokens-per-second", type=float, help="speed of every model (0: max)")
    timing.add_argument("--first-token-seconds", type=float, help="prompt eval of every model")
    faults = parser.add_argument_group("fault injection")
    faults.add_argument("--fault-config", metavar="FILE", help="JSON fault configuration")
    faults.add_argument("--error-rate-500", type=float, help="chance of a 500 per request")
    faults.add_argument("--error-rate-503", type=float, help="chance of a 503 per request")
    faults.add_argument("--crash-after-tokens", type=int, help="fail every stream after N tokens")
    faults.add_argument("--stall-seconds", type=float, help="pause streams for T seconds")
    faults.add_argument("--stall-after-tokens", type=int, help="... after N tokens")
    faults.add_argument("--first-byte-delay", type=float, help="extra seconds before first byte")
    faults.add_argument(
        "--legacy-errors",
        action="store_true",
        help="pre-first-token errors as HTTP 200 + error line (before v0.12.6)",
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Defaults, then env vars, then the config file, then flags."""
    config = apply_env(SimConfig())
    if args.config:
        load_file(config, args.config)
    for flag in ("num_parallel", "max_queue", "max_loaded_models", "speed", "seed"):
        value = getattr(args, flag)
        if value is not None:
            setattr(config, flag, value)
    if args.keep_alive is not None:
        raw = args.keep_alive
        config.keep_alive_s = keep_alive_from_json(float(raw) if _is_number(raw) else raw)
    config.no_delay = config.no_delay or args.no_delay
    overrides = {
        "load_s": args.load_seconds,
        "tokens_per_s": args.tokens_per_second,
        "first_token_s": args.first_token_seconds,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config.models = [dataclasses.replace(m, **overrides) for m in config.models]
    config.faults = _faults_from_args(args, config.faults)
    validate(config)
    return config


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _faults_from_args(args: argparse.Namespace, base: dict) -> dict:
    faults = dict(base)
    if args.fault_config:
        try:
            faults.update(json.loads(Path(args.fault_config).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read fault config: {exc}") from exc
    rates = dict(faults.get("error_rate") or {})
    if args.error_rate_500 is not None:
        rates["500"] = args.error_rate_500
    if args.error_rate_503 is not None:
        rates["503"] = args.error_rate_503
    if rates:
        faults["error_rate"] = rates
    for flag, key in (
        ("crash_after_tokens", "crash_after_tokens"),
        ("stall_seconds", "stall_seconds"),
        ("stall_after_tokens", "stall_after_tokens"),
        ("first_byte_delay", "first_byte_delay_seconds"),
    ):
        if getattr(args, flag) is not None:
            faults[key] = getattr(args, flag)
    if args.legacy_errors:
        faults["legacy_errors"] = True
    try:
        validate_faults(faults)
    except FaultConfigError as exc:
        raise ConfigError(str(exc)) from exc
    return faults


async def _serve(config: SimConfig, host: str, port: int) -> None:
    simulator = Simulator(config)
    url = await simulator.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ollama-sim listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        await simulator.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"ollama-sim: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:
        print(f"ollama-sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
