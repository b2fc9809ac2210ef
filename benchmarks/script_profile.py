"""Redis's time per task, script by script: ``python -m benchmarks.script_profile``.

Records every command Redis runs for ``--tasks`` corral tasks submitted one at a time (MONITOR,
on the standard stack of ``throughput``), then replays the clients' commands in the order Redis
ran them on a fresh Redis of the same build, one at a time, and reads Redis's own clock (INFO
commandstats) around each script call. Per script: calls per task, Redis time per call, and the
part of it spent in the script's own commands; the rest is the script's Lua (its arguments, the
functions it defines, its JSON and number formatting). Commands outside scripts are summed by
name. MONITOR slows the recorded run, not the replay; blocking and pub/sub commands are left out
of it (they wait, or need a subscriber). Scripts are named by the module constant holding their
text; one not found is shown by its digest.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import pkgutil
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis

from benchmarks.stack import MODEL, Context, Standard
from benchmarks.worker_profile import OPTIONS, PROMPT, commands
from workers.embedded_redis import EmbeddedRedis

# Not replayed: they wait, need a subscriber, or are the connection's or this tool's own.
SKIPPED = {
    *("MONITOR", "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE"),
    *("BRPOP", "BLPOP", "BZPOPMIN", "MULTI", "EXEC"),
    *("CLIENT", "HELLO", "SELECT", "INFO", "PING", "ECHO", "SCRIPT"),
}
END_MARK = b"script_profile: recorded"  # ECHOed once the tasks ran: MONITOR's last line read
_LINE = re.compile(r"^[\d.]+ \[\d+ ([^\]]+)\] (.*)$", re.S)
_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}


def parse_monitor_line(line: str) -> tuple[str, list[bytes]] | None:
    """A MONITOR line as (its client, the command's arguments), or None if it is not one."""
    match = _LINE.match(line)
    if match is None:
        return None
    source, rest = match.groups()
    args: list[bytes] = []
    i = 0
    while i < len(rest):
        if rest[i] != '"':
            i += 1
            continue
        i += 1
        arg = bytearray()
        while rest[i] != '"':
            if rest[i] == "\\":
                if rest[i + 1] == "x":
                    arg.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                else:
                    arg += _ESCAPES.get(rest[i + 1], rest[i + 1].encode())
                    i += 2
                continue
            arg += rest[i].encode()
            i += 1
        args.append(bytes(arg))
        i += 1
    return source, args


def project_scripts() -> dict[str, tuple[str, str]]:
    """The project's Lua scripts by digest, each as (``module.CONSTANT``, its text): every
    string constant of the project's packages that calls Redis."""
    scripts: dict[str, tuple[str, str]] = {}
    for package in ("tasks", "workers", "producers"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if isinstance(value, str) and "redis.call(" in value:
                    digest = hashlib.sha1(value.encode()).hexdigest()
                    label = f"{info.name.rpartition('.')[2]}.{name}"
                    scripts.setdefault(digest, (label, value))
    return scripts


def record(stack: Standard, client: redis.Redis, tasks: int) -> list[list[bytes]]:
    """The clients' commands (not those run inside scripts) while ``tasks`` run one at a time."""
    connection = client.connection_pool.make_connection()
    connection.send_command("MONITOR")
    connection.read_response()
    try:
        for _ in range(tasks):
            stack.client.generate(MODEL, PROMPT, options=OPTIONS).result(timeout=60)
        client.echo(END_MARK)
        recorded: list[list[bytes]] = []
        while True:
            parsed = parse_monitor_line(_text(connection.read_response()))
            if parsed is None or parsed[0] == "lua":
                continue
            if parsed[1] == [b"ECHO", END_MARK]:
                return recorded
            recorded.append(parsed[1])
    finally:
        connection.disconnect()


def _text(reply: bytes | str) -> str:
    return reply.decode("latin-1") if isinstance(reply, bytes) else reply


def replay(
    recorded: list[list[bytes]], scripts: dict[str, tuple[str, str]]
) -> Iterator[tuple[str, int, int]]:
    """Replays ``recorded`` on a fresh Redis; yields (what, Redis µs, µs in its own commands)
    for each script call, and (command name, Redis µs, 0) for each other command."""
    with EmbeddedRedis() as server:
        target = redis.Redis.from_url(server.url)
        probe = redis.Redis.from_url(server.url)  # INFO on its own connection
        called = {args[1].decode() for args in recorded if args[0].upper() == b"EVALSHA"}
        for digest in called & scripts.keys():  # only these, as in the recorded run
            target.script_load(scripts[digest][1])
        for args in recorded:
            name = args[0].decode().upper()
            if name in SKIPPED:
                continue
            before = commands(probe)
            try:
                target.execute_command(*args)
            except redis.exceptions.NoScriptError:
                yield f"{args[1].decode()[:12]} (not in Redis)", 0, 0
                continue
            after = commands(probe)
            spent = {n: u - before.get(n, (0, 0))[1] for n, (_, u) in after.items() if n != "info"}
            key = name.lower()
            if name in ("EVALSHA", "EVAL"):
                text = args[1]
                digest = text.decode() if name == "EVALSHA" else hashlib.sha1(text).hexdigest()
                own = sum(t for n, t in spent.items() if n != key)
                yield scripts.get(digest, (digest[:12], ""))[0], spent.get(key, 0), own
            else:
                yield name, spent.get(key, 0), 0


def profile(ctx: Context, tasks: int) -> None:
    stack = ctx.standard_stack()
    client = redis.Redis.from_url(ctx.redis_url)
    for _ in range(20):  # warm: scripts loaded, connections open
        stack.client.generate(MODEL, PROMPT, options=OPTIONS).result(timeout=60)
    recorded = record(stack, client, tasks)
    client.close()
    per: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for what, spent, own in replay(recorded, project_scripts()):
        row = per[what]
        row[0], row[1], row[2] = row[0] + 1, row[1] + spent, row[2] + own
    total = sum(row[1] for row in per.values())
    print(f"{tasks} tasks, one at a time: Redis time per task {total / tasks:.0f} µs")
    print(f"  {'script or command':32} {'calls/task':>10} {'µs/call':>8} {'in commands':>11}")
    for what, (calls, spent, own) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        if spent / tasks >= 0.5:
            print(f"  {what:32} {calls / tasks:10.2f} {spent / calls:8.1f} {own / calls:11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.script_profile")
    parser.add_argument("--tasks", type=int, default=300, help="tasks recorded")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-profile-") as tmp, EmbeddedRedis() as server:
        ctx = Context(server, Path(tmp), quick=False, repeats=None, log=lambda _: None)
        with ctx.scope():
            profile(ctx, args.tasks)


if __name__ == "__main__":
    main()
