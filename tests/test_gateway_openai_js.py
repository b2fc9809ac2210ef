"""The official ``openai`` JS client from npm against the gateway: one smoke test of every route.

Runs when ``node`` and ``npm`` are present and npm can install the pinned client; skipped with
the reason otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_gateway_support import gateway_url_fixture  # noqa: F401

HERE = Path(__file__).parent / "js"
CHAT_MODEL = "llama3.2"
EMBED_MODEL = "all-minilm"  # an embedding model the session's worker serves


@pytest.fixture(scope="module")
def node_client() -> Path:
    """The directory holding the pinned ``openai`` package, installed once per checkout."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the JS client check; install Node.js 20+")
    if not (HERE / "node_modules" / "openai" / "package.json").exists():
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--silent"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.skip(f"npm could not install the openai client: {done.stderr.strip()[-300:]}")
    return HERE


@pytest.mark.slow
def test_the_official_js_client_works_unchanged(node_client: Path, gateway_url: str) -> None:
    done = subprocess.run(
        ["node", "openai_smoke.mjs", f"{gateway_url}/v1", CHAT_MODEL, EMBED_MODEL],
        cwd=node_client,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)

    chat = seen["chat"]
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["content"] and chat["finish"] == "stop"
    usage = chat["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    stream = seen["stream"]
    assert len(stream["ids"]) == 1 and stream["firstRole"] == "assistant"
    assert stream["text"].strip()
    assert stream["finishes"][-1] == "stop" and not any(stream["finishes"][:-1])
    assert stream["lastChoices"] == 0 and stream["lastUsage"]["completion_tokens"] > 0

    embeddings = seen["embeddings"]  # the JS client asks for base64 and decodes it itself
    assert embeddings["indexes"] == [0, 1] and embeddings["finite"]
    assert len(set(embeddings["lengths"])) == 1 and embeddings["lengths"][0] > 0
    assert embeddings["usage"]["prompt_tokens"] > 0

    assert {f"{CHAT_MODEL}:latest", f"{EMBED_MODEL}:latest"} <= set(seen["models"])
    assert seen["missing"] == {
        "name": "NotFoundError",
        "status": 404,
        "type": "invalid_request_error",
    }
