"""Peak RSS of reading and checking a large batch input: ``python -m benchmarks.batch_reader_rss``.

Writes a JSONL file of ``--lines`` chat lines of about ``--line-bytes`` each (50,000 x 4 KB:
about 200 MB) to a temporary folder, then reads it with the batch reader (every line parsed and
validated, as a submission does; no Redis) and prints the process's peak RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from tasks.batches import Line, lines_of, read_lines
from tasks.settings import load_settings


def write_input(path: Path, lines: int, line_bytes: int) -> int:
    filler = "x" * max(line_bytes - 200, 1)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(lines):
            body = {"model": "llama3.2", "messages": [{"role": "user", "content": filler}]}
            item = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            out.write(json.dumps(item) + "\n")
    return path.stat().st_size


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--line-bytes", type=int, default=4_000)
    args = parser.parse_args()
    settings = load_settings()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.jsonl"
        size = write_input(path, args.lines, args.line_bytes)
        before = peak_rss_mb()
        started = time.perf_counter()
        valid = sum(
            isinstance(item, Line)
            for item in read_lines(lines_of(path), settings, lambda _model: True)
        )
        elapsed = time.perf_counter() - started
        after = peak_rss_mb()
    print(f"file: {args.lines} lines, {size / 2**20:.0f} MB; valid lines: {valid}")
    print(f"read and checked in {elapsed:.1f} s ({args.lines / elapsed:.0f} lines/s)")
    print(f"peak RSS: {before:.0f} MB before reading, {after:.0f} MB after")


if __name__ == "__main__":
    main()
