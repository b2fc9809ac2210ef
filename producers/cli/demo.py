"""``corral demo``: Redis, Ollama (or the simulator), a worker, and one task of each kind."""

from __future__ import annotations

import io
import os
import sys
import time
from contextlib import ExitStack

import click
from PIL import Image, ImageDraw
from pydantic import BaseModel

from producers.cli.local_stack import ollama_answers, start_simulator, start_worker
from producers.cli.render import BOLD, dump_json, print_events, raise_for_terminal, styled, table
from producers.client import Client
from producers.jobs import Job
from tasks.keys import canonical_model
from tasks.kinds.structured import StructuredResult
from tasks.redis_url import masked
from tasks.settings import load_settings
from workers.embedded_redis import EmbeddedRedis, is_reachable
from workers.ollama_client import parse_host


class Book(BaseModel):
    title: str
    author: str
    year: int


class Reading(BaseModel):
    books: list[Book]


def heading(text: str) -> None:
    click.echo("\n" + styled(f"── {text} " + "─" * max(0, 60 - len(text)), BOLD, sys.stdout))


def demo_image() -> bytes:
    """A small real PNG: a sunset of sorts, so the vision model has something to describe."""
    image = Image.new("RGB", (320, 200), (40, 70, 140))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 130, 320, 200), fill=(30, 110, 50))
    draw.ellipse((200, 40, 270, 110), fill=(250, 200, 60))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def summary(jobs: list[Job]) -> None:
    """One row per task: what ran where, how many tokens, how fast."""
    rows = []
    for job in jobs:
        result = job.result(timeout=10)
        timings, metrics = result.timings, result.metrics
        rate = metrics.tokens_per_s
        rows.append(
            (
                result.kind,
                result.model,
                metrics.eval_count,
                f"{timings.time_to_first_token_s * 1000:.0f}"
                if timings.time_to_first_token_s
                else "",
                f"{timings.total_s:.2f}" if timings.total_s is not None else "",
                f"{rate:.0f}" if rate else "",
                result.worker,
            )
        )
    table(["KIND", "MODEL", "TOKENS", "TTFT MS", "TOTAL S", "TOKENS/S", "WORKER"], rows)


def run_demo(text_model: str, thinking_model: str, vision_model: str) -> int:
    models = [canonical_model(m) for m in (text_model, thinking_model, vision_model)]
    with ExitStack() as stack:
        redis_url = os.environ.get("CORRAL_REDIS_URL")
        if not redis_url or not is_reachable(redis_url):
            redis = stack.enter_context(EmbeddedRedis())
            redis_url = redis.url
            click.echo(f"redis:  embedded redis-server at {redis_url}")
        else:
            click.echo(f"redis:  {masked(redis_url)}")

        ollama = os.environ.get("OLLAMA_HOST")
        if ollama and ollama_answers(parse_host(ollama)):
            ollama = parse_host(ollama)
            click.echo(f"ollama: {ollama}")
        else:
            sim, ollama = start_simulator()
            stack.callback(sim.stop)
            click.echo(f"ollama: simulator at {ollama} (set OLLAMA_HOST to use a real Ollama)")

        started = time.monotonic()
        worker = start_worker(models, redis_url=redis_url, ollama_host=ollama, slots=2)
        stack.callback(worker.stop)
        click.echo(
            f"worker: {worker.node_name} ready in {time.monotonic() - started:.1f} s, "  # type: ignore[attr-defined]
            f"queues {', '.join('corral.' + m for m in models)}"
        )

        client = stack.enter_context(Client(settings=load_settings(redis_url=redis_url)))

        jobs = []
        heading(f"generate · {models[0]}")
        job = client.generate(
            models[0], "Why is the sky blue? Answer in two sentences.", options={"num_predict": 48}
        )
        raise_for_terminal(print_events(job.stream(timeout=120)))
        jobs.append(job)

        heading(f"chat · {models[1]} (two turns, history kept)")
        conversation = client.conversation(models[1])
        for question in ("Recommend a classic science-fiction novel.", "Who wrote it, and when?"):
            click.echo(styled(f"> {question}", BOLD, sys.stdout))
            job = conversation.submit(question, think=True, options={"num_predict": 40})
            raise_for_terminal(print_events(job.stream(timeout=120)))
            conversation.remember(question, job.result(timeout=120))
            jobs.append(job)

        heading(f"structured · {models[0]} (validated against a pydantic model)")
        job = client.structured(models[0], Reading, prompt="List two books worth reading.")
        structured = job.result(timeout=120)
        if not isinstance(structured, StructuredResult):
            raise TypeError(f"expected a structured result, got {structured.kind}")
        reading = structured.data
        dump_json(reading.model_dump())
        jobs.append(job)

        heading(f"multimodal · {models[2]} (an image made by this demo)")
        job = client.multimodal(
            models[2], "What is in this picture?", [demo_image()], options={"num_predict": 40}
        )
        raise_for_terminal(print_events(job.stream(timeout=120)))
        jobs.append(job)

        heading("summary")
        summary(jobs)
        click.echo("\nfour kinds, five tasks, all succeeded; shutting down")
    return 0
