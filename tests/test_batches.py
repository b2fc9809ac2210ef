"""Batches end to end: a JSONL file in, OpenAI's output and error lines out, through the SDK."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producers import Batch, Client
from tasks.batches import STORE_FILE, STORE_REDIS
from tasks.keys import batch_lines_key
from tasks.settings import Settings

pytestmark = pytest.mark.usefixtures("worker")
WAIT_S = 60
LINE_KEYS = {"id", "custom_id", "response", "error"}


def chat(custom_id: str, content: str = "Say hi.", model: str = "llama3.2",
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, **extra}  # fmt: skip
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body}  # fmt: skip


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.fixture
def bclient(settings: Settings, tmp_path: Path) -> Iterator[Client]:
    with Client(settings=settings.model_copy(update={"batch_dir": tmp_path / "b"})) as c:
        yield c


def test_small_batch_end_to_end(bclient: Client, tmp_path: Path) -> None:
    lines = [
        chat("c1"),
        {"custom_id": "t1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "llama3.2", "prompt": "Once upon", "max_tokens": 5}},
        {"custom_id": "n1", "method": "POST", "url": "/v1/tasks/generate",
         "body": {"model": "llama3.2", "prompt": "Hi", "options": {"num_predict": 4}}},
    ]  # fmt: skip
    batch = bclient.batch(write_jsonl(tmp_path / "in.jsonl", lines), key="e2e")
    assert isinstance(batch, Batch) and batch.id.startswith("batch_")
    seen: list[str] = []
    info = batch.wait(progress=lambda i: seen.append(i.status), timeout=WAIT_S)
    assert info.status == "completed", info
    assert (info.total, info.completed, info.failed) == (3, 3, 0)
    assert info.store == STORE_REDIS and seen[-1] == "completed"
    out = {line["custom_id"]: line for line in batch.results()}
    assert set(out) == {"c1", "t1", "n1"} and list(batch.errors()) == []
    for line in out.values():
        assert set(line) == LINE_KEYS and line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert set(line["response"]) == {"status_code", "request_id", "body"}
        assert line["response"]["status_code"] == 200
    chat_body = out["c1"]["response"]["body"]
    assert chat_body["object"] == "chat.completion" and chat_body["id"].startswith("chatcmpl-")
    assert chat_body["choices"][0]["message"]["content"]
    assert chat_body["usage"]["completion_tokens"] > 0
    assert out["t1"]["response"]["body"]["object"] == "text_completion"
    assert out["n1"]["response"]["body"]["result"]["text"]
    openai = info.to_openai()
    assert openai["object"] == "batch" and openai["status"] == "completed"
    assert openai["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert openai["completion_window"] == "24h" and openai["completed_at"]
