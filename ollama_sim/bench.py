"""Measure the simulator: ``python -m ollama_sim.bench [--seconds S]``.

Starts ``python -m ollama_sim --no-delay`` in a subprocess and reports:

* non-stream generate requests/s through a pooled ``requests.Session`` (1 and 4 threads),
* streamed tokens/s on one connection (a 2,000-token generate),
* wall time for 200 concurrent streaming clients to complete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests

_SHORT: dict[str, Any] = {
    "model": "llama3.2",
    "prompt": "bench",
    "stream": False,
    "options": {"num_predict": 8},
}


def start_simulator(extra: Sequence[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "ollama_sim", "--port", "0", "--no-delay", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    match = re.search(r"http://\S+", process.stdout.readline())
    if not match:
        process.kill()
        raise RuntimeError("the simulator did not start")
    return process, match.group(0)


def requests_per_second(url: str, threads: int, seconds: float) -> float:
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def worker(index: int) -> None:
        with requests.Session() as http:
            while time.perf_counter() < deadline:
                response = http.post(f"{url}/api/generate", json=_SHORT, timeout=30)
                response.raise_for_status()
                counts[index] += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def stream_tokens_per_second(url: str, tokens: int = 2000, rounds: int = 5) -> float:
    body: dict[str, Any] = {
        "model": "llama3.2",
        "prompt": "stream",
        "options": {"num_predict": tokens},
    }
    best = 0.0
    with requests.Session() as http:
        for _ in range(rounds):
            start = time.perf_counter()
            count = 0
            with http.post(f"{url}/api/generate", json=body, stream=True, timeout=60) as response:
                for line in response.iter_lines(chunk_size=65536):
                    if not json.loads(line)["done"]:
                        count += 1
            best = max(best, count / (time.perf_counter() - start))
            if count != tokens:
                raise RuntimeError(f"expected {tokens} tokens, got {count}")
    return best


async def _one_stream(host: str, port: int, index: int) -> bool:
    reader, writer = await asyncio.open_connection(host, port)
    body = json.dumps(
        {"model": "llama3.2", "prompt": f"client {index}", "options": {"num_predict": 50}}
    ).encode()
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return b'"done":true' in data


def concurrent_streams(url: str, clients: int = 200) -> tuple[int, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)

    async def run() -> list[bool]:
        return await asyncio.gather(*(_one_stream(host, int(port), i) for i in range(clients)))

    start = time.perf_counter()
    done = asyncio.run(run())
    return sum(done), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_sim.bench")
    parser.add_argument("--seconds", type=float, default=3.0, help="per request/s measurement")
    parser.add_argument("--num-parallel", type=int, default=4)
    args = parser.parse_args(argv)
    process, url = start_simulator(["--num-parallel", str(args.num_parallel)])
    try:
        requests.post(f"{url}/api/generate", json={"model": "llama3.2"}, timeout=30)
        print(f"simulator: {url} (--no-delay --num-parallel {args.num_parallel})")
        for threads in (1, 4):
            rate = requests_per_second(url, threads, args.seconds)
            print(f"non-stream generate, {threads} thread(s): {rate:,.0f} req/s")
        print(f"streamed tokens on one connection: {stream_tokens_per_second(url):,.0f} tokens/s")
        done, wall = concurrent_streams(url)
        print(f"200 concurrent streams (50 tokens each): {done} completed in {wall:.2f} s")
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
