"""Peak RSS of the gateway while it takes a large batch file: ``python -m
benchmarks.gateway_upload_rss``.

Starts an embedded Redis and ``corral gateway`` (a process of its own), writes a JSONL file of
``--lines`` chat lines (50,000 x 4 KB: about 190 MB), uploads it to ``POST /v1/files`` as a
streamed multipart body, and prints the gateway's peak RSS (``VmHWM``) before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import requests

from benchmarks.batch_reader_rss import write_input
from workers.embedded_redis import EmbeddedRedis, free_port

CHUNK = 1 << 20


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def multipart(path: Path, boundary: str) -> Iterator[bytes]:
    """The form (purpose, file) a megabyte at a time: the sender holds no more either."""
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"'
        "\r\nContent-Type: application/jsonl\r\n\r\n"
    ).encode()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--line-bytes", type=int, default=4_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, EmbeddedRedis() as redis_server:
        path = Path(folder) / "input.jsonl"
        size = write_input(path, args.lines, args.line_bytes)
        port = free_port()
        env = {
            **os.environ,
            "CORRAL_REDIS_URL": redis_server.url,
            "CORRAL_BATCH_DIR": str(Path(folder) / "batches"),
        }
        gateway = subprocess.Popen(
            [sys.executable, "-m", "producers.cli", "gateway", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{url}/healthz", timeout=1).raise_for_status()
                    break
                except requests.RequestException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            before = peak_rss_mb(gateway.pid)
            boundary = uuid.uuid4().hex
            started = time.perf_counter()
            answer = requests.post(
                f"{url}/v1/files",
                data=multipart(path, boundary),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                timeout=600,
            )
            elapsed = time.perf_counter() - started
            answer.raise_for_status()
            after = peak_rss_mb(gateway.pid)
        finally:
            gateway.terminate()
            gateway.wait(15)
    stored = answer.json()
    print(f"file: {args.lines} lines, {size / 2**20:.0f} MB; stored as {stored['id']}")
    print(f"uploaded in {elapsed:.1f} s ({size / 2**20 / elapsed:.0f} MB/s)")
    print(f"gateway peak RSS: {before:.0f} MB before the upload, {after:.0f} MB after")


if __name__ == "__main__":
    main()
