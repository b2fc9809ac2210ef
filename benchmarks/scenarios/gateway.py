"""The gateway's added latency against the SDK: one task at a time, interleaved call by call.

Subjects: the SDK (submit, then ``result()``), the native API (POST, then SSE until ``done``),
the Ollama facade, ``stream: false`` and streamed, and the OpenAI chat route, not streamed and
streamed (measured against an SDK chat, the same task kind), and embeddings through the
OpenAI route and the facade's ``/api/embed`` (measured against an SDK ``embed``). The gateway
runs in this process on uvicorn (a thread), in front of the standard stack's Redis and workers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import requests
import uvicorn

from benchmarks.registry import scenario
from benchmarks.stack import MODEL, Context
from benchmarks.stats import Metrics, interleaved, percentile, ratio
from producers.gateway import create_app, load_gateway_config
from tasks.settings import load_settings
from workers.embedded_redis import free_port

EMBED_MODEL = "all-minilm:latest"  # in the simulator's catalogue, served by a second worker
PROMPT = "Why is the sky blue?"
OPTIONS: dict[str, Any] = {"num_predict": 16, "temperature": 0}


def start_gateway(ctx: Context) -> str:
    port = free_port()
    app = create_app(load_settings(redis_url=ctx.redis_url), load_gateway_config())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start")
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(15)

    ctx.on_exit(stop)
    return f"http://127.0.0.1:{port}"


@scenario("gateway", "the gateway's added latency against the SDK", order=70)
def run(ctx: Context, metrics: Metrics) -> None:
    stack = ctx.standard_stack()
    ctx.corral_worker([EMBED_MODEL], stack.sim, slots=stack.slots)
    url = start_gateway(ctx)
    http = requests.Session()
    http.trust_env = False
    ctx.on_exit(http.close)
    body: dict[str, Any] = {"model": MODEL, "prompt": PROMPT, "options": OPTIONS}

    def sdk() -> None:
        stack.client.generate(MODEL, PROMPT, options=OPTIONS).result(timeout=30)

    def native() -> None:
        task = http.post(f"{url}/v1/tasks/generate", json=body, timeout=30).json()
        with http.get(task["events_url"], stream=True, timeout=30) as reply:
            for line in reply.iter_lines():
                if line == b"event: done":
                    break

    def facade() -> None:
        http.post(
            f"{url}/api/generate", json={**body, "stream": False}, timeout=30
        ).raise_for_status()

    def facade_stream() -> None:
        with http.post(f"{url}/api/generate", json=body, stream=True, timeout=30) as reply:
            for _ in reply.iter_lines():
                pass

    messages = [{"role": "user", "content": PROMPT}]
    chat_body: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 16,
        "temperature": 0,
    }

    def sdk_chat() -> None:
        stack.client.chat(MODEL, messages, options=OPTIONS).result(timeout=30)

    def openai_chat() -> None:
        http.post(f"{url}/v1/chat/completions", json=chat_body, timeout=30).raise_for_status()

    def openai_stream() -> None:
        with http.post(
            f"{url}/v1/chat/completions",
            json={**chat_body, "stream": True},
            stream=True,
            timeout=30,
        ) as reply:
            for _ in reply.iter_lines():
                pass

    def sdk_embed() -> None:
        stack.client.embed(EMBED_MODEL, PROMPT).result(timeout=30)

    def openai_embed() -> None:
        http.post(
            f"{url}/v1/embeddings", json={"model": EMBED_MODEL, "input": PROMPT}, timeout=30
        ).raise_for_status()

    def facade_embed() -> None:
        http.post(
            f"{url}/api/embed", json={"model": EMBED_MODEL, "input": PROMPT}, timeout=30
        ).raise_for_status()

    subjects = {
        "sdk": sdk,
        "native_sse": native,
        "facade": facade,
        "facade_stream": facade_stream,
        "sdk_chat": sdk_chat,
        "openai": openai_chat,
        "openai_stream": openai_stream,
        "sdk_embed": sdk_embed,
        "openai_embed": openai_embed,
        "facade_embed": facade_embed,
    }
    baseline = {  # else "sdk"
        "openai": "sdk_chat",
        "openai_stream": "sdk_chat",
        "openai_embed": "sdk_embed",
        "facade_embed": "sdk_embed",
    }
    calls = ctx.size(300, 30)
    for fn in subjects.values():
        for _ in range(ctx.size(20, 3)):
            fn()
    for repeat in ctx.repeats(5):
        samples = interleaved(subjects, calls, repeat)
        sdk_p50 = percentile(samples["sdk"], 50)
        for name, values in samples.items():
            metrics.add(f"{name} p50", percentile(values, 50), "ms")
            metrics.add(f"{name} p99", percentile(values, 99), "ms")
            if not name.startswith("sdk"):
                base = baseline.get(name, "sdk")
                base_p50 = percentile(samples[base], 50)
                metrics.add(f"{name} added p50", percentile(values, 50) - base_p50, "ms")
                metrics.add(
                    f"{name} p50 / {base} p50",
                    ratio(percentile(values, 50), base_p50),
                    "x",
                    kind="ratio",
                )
        ctx.log(
            f"gateway repeat {repeat + 1}: sdk p50 {sdk_p50:.2f} ms, native+SSE p50 "
            f"{percentile(samples['native_sse'], 50):.2f} ms"
        )
    tokens = OPTIONS["num_predict"]
    metrics.note(
        f"{calls} calls per subject per repeat, interleaved; {tokens} tokens; "
        f"gateway in-process on uvicorn; worker --slots {stack.slots}"
    )
