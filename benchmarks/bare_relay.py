"""The bare relay, the baseline of ``many_streams``: a thread per stream reading Ollama's NDJSON
and doing one Redis ``PUBLISH`` per token, and nothing else (no task, record, log or seq).

``python -m benchmarks.bare_relay --ollama URL --redis URL --model M --streams N --tokens T``
publishes on ``bench:relay:<n>``: ``{"seq", "text", "first_at"}`` per token (``first_at``: when
this stream's first line was read, the clock corral's ``first_token_at`` keeps), then
``{"type": "done"}``. It exits when every stream has ended.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import redis
import requests

CHANNEL_PREFIX = "bench:relay:"


def relay(
    n: int, ollama: str, client: redis.Redis, model: str, tokens: int, go: threading.Event
) -> None:
    channel = f"{CHANNEL_PREFIX}{n}"
    body: dict[str, Any] = {
        "model": model,
        "prompt": f"Stream {n}.",
        "options": {"num_predict": tokens},
    }
    go.wait()
    try:
        stream(channel, ollama, client, body)
    finally:  # the subscriber counts ends, even of a stream that failed
        client.publish(channel, json.dumps({"type": "done"}))


def stream(channel: str, ollama: str, client: redis.Redis, body: dict[str, Any]) -> None:
    with requests.Session() as session:
        response = session.post(f"{ollama}/api/generate", json=body, stream=True, timeout=600)
        response.raise_for_status()
        first_at = 0.0
        seq = 0
        for line in response.iter_lines():
            chunk = json.loads(line)
            text = chunk.get("response")
            if text:
                first_at = first_at or time.time()
                message = {"seq": seq, "text": text, "first_at": first_at}
                client.publish(channel, json.dumps(message))
                seq += 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_relay")
    parser.add_argument("--ollama", required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis, max_connections=args.streams + 4)
    go = threading.Event()
    threads = [
        threading.Thread(
            target=relay, args=(n, args.ollama, client, args.model, args.tokens, go), daemon=True
        )
        for n in range(args.streams)
    ]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
