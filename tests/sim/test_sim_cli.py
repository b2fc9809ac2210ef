"""``python -m ollama_sim`` as a process: the URL line, flags, config files, clean exits."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests


class Process:
    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "ollama_sim", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.popen.stdout is not None
        self.line = self.popen.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", self.line)
        self.url = match.group(0) if match else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        code = self.popen.wait(timeout=10)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        return code


@pytest.fixture
def launch() -> Iterator:
    started: list[Process] = []

    def start(*args: str) -> Process:
        started.append(Process(*args))
        return started[-1]

    yield start
    for process in started:
        if process.popen.poll() is None:
            process.stop(signal.SIGKILL)
        else:
            process.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_prints_one_url_line_and_exits_cleanly(launch, sig: int) -> None:
    process = launch("--no-delay")
    assert process.line.startswith("ollama-sim listening on http://127.0.0.1:")
    assert not process.line.endswith(":0\n")
    assert requests.get(process.url, timeout=10).text == "Ollama is running"
    assert process.stop(sig) == 0
    assert process.popen.stdout is not None


def test_flags_and_config_file(launch, tmp_path: Path) -> None:
    config = tmp_path / "sim.json"
    config.write_text(
        json.dumps(
            {
                "num_parallel": 2,
                "models": [
                    {
                        "name": "tiny",
                        "capabilities": ["completion"],
                        "load_s": 0,
                        "tokens_per_s": 0,
                        "first_token_s": 0,
                    }
                ],
            }
        )
    )
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"crash_after_tokens": 3}))
    process = launch(
        "--config",
        str(config),
        "--fault-config",
        str(faults),
        "--max-loaded-models",
        "1",
        "--keep-alive",
        "90",
        "--error-rate-500",
        "0.0",
    )
    with requests.Session() as http:
        tags = http.get(f"{process.url}/api/tags", timeout=10).json()["models"]
        assert [m["name"] for m in tags] == ["tiny:latest"]
        sim_config = http.get(f"{process.url}/_sim/config", timeout=10).json()
        assert (
            sim_config["num_parallel"],
            sim_config["max_loaded_models"],
            sim_config["keep_alive"],
        ) == (2, 1, 90)
        assert http.get(f"{process.url}/_sim/faults", timeout=10).json()["crash_after_tokens"] == 3
    assert process.stop() == 0


def test_bad_config_exits_with_an_error(launch, tmp_path: Path) -> None:
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"num_parallel": 1, "surprise": True}))
    process = launch("--config", str(config))
    assert process.url == ""
    assert process.popen.wait(timeout=10) == 2
    assert process.popen.stderr is not None and "surprise" in process.popen.stderr.read()
