"""HTTP and NDJSON framing details that the official client hides."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import pytest
import requests
from sim_support import RUNNER_STOPPED, wait_event

UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z$")
LOCAL_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)$")


def raw_lines(response: requests.Response) -> list[bytes]:
    return response.content.split(b"\n")


@pytest.fixture
def sock(sim) -> Iterator[socket.socket]:
    host, port = sim.url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=10)
    yield connection
    connection.close()


class ResponseReader:
    """Reads consecutive Content-Length responses from one socket."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.connection.recv(65536)
        assert chunk, "connection closed"
        self.buffer += chunk

    def next(self) -> tuple[bytes, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        while len(rest) < length:
            self._fill()
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.buffer = rest[length:]
        return head, rest[:length]


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
def test_stream_lines_are_compact_objects_without_blank_lines(http, sim, path: str) -> None:
    body = {
        "model": "deepseek-r1:14b",
        "prompt": "hi",
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = http.post(f"{sim.url}{path}", json=body)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.headers
    lines = raw_lines(response)
    assert lines[-1] == b""  # every line ends with a newline ...
    lines = lines[:-1]
    assert all(lines)  # ... and none is blank
    objects = [json.loads(line) for line in lines]
    for line, obj in zip(lines, objects, strict=True):
        assert line.decode() == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        assert UTC_STAMP.match(obj["created_at"])
    *middle, final = objects
    for obj in middle:
        if path == "/api/chat":
            assert set(obj) == {"model", "created_at", "message", "done"}
            assert set(obj["message"]) in ({"role", "content"}, {"role", "content", "thinking"})
        else:
            assert set(obj) in (
                {"model", "created_at", "response", "done"},
                {"model", "created_at", "response", "thinking", "done"},
            )
        assert obj["done"] is False
    assert final["done"] is True and final["done_reason"] == "stop"
    assert "error" not in final
    metrics = {
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }
    assert metrics <= set(final)
    assert all(isinstance(final[k], int) and final[k] > 0 for k in metrics)
    assert ("context" in final) == (path == "/api/generate")


def test_non_stream_omits_empty_fields(http, sim) -> None:
    response = http.post(
        f"{sim.url}/api/chat",
        json={
            "model": "llama3.2",
            "stream": False,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert int(response.headers["Content-Length"]) == len(response.content)
    body = response.json()
    assert set(body["message"]) == {"role", "content"}
    assert "thinking" not in body and "tool_calls" not in body["message"]
    generate = http.post(
        f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
    ).json()
    assert "thinking" not in generate


def test_keys_match_fields_case_insensitively_as_in_go(http, sim) -> None:
    reply = http.post(
        f"{sim.url}/api/chat",
        json={
            "MODEL": "llama3.2",
            "Stream": False,
            "Options": {"num_predict": 3},
            "Messages": [{"Role": "user", "CONTENT": "hi"}],
        },
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "llama3.2" and reply.json()["eval_count"] == 3
    wrong = http.post(f"{sim.url}/api/generate", json={"Model": "llama3.2", "PROMPT": 7})
    assert wrong.status_code == 400
    assert wrong.json()["error"] == (
        "json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string"
    )


@pytest.mark.parametrize(
    ("method", "path", "status", "text"),
    [
        ("GET", "/nope", 404, "404 page not found"),
        ("POST", "/api/unknown", 404, "404 page not found"),
        ("GET", "/api/generate", 405, "405 method not allowed"),
        ("POST", "/api/tags", 405, "405 method not allowed"),
        ("DELETE", "/api/ps", 405, "405 method not allowed"),
    ],
)
def test_unknown_paths_and_methods_are_plain_text(http, sim, method, path, status, text) -> None:
    response = http.request(method, f"{sim.url}{path}")
    assert response.status_code == status
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == text


def test_health_version_and_head(http, sim) -> None:
    root = http.get(sim.url)
    assert (root.status_code, root.text) == (200, "Ollama is running")
    assert root.headers["Content-Type"] == "text/plain; charset=utf-8"
    head = http.head(sim.url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == str(len("Ollama is running"))
    assert re.fullmatch(r"\d+\.\d+\.\d+", http.get(f"{sim.url}/api/version").json()["version"])
    assert http.head(f"{sim.url}/api/tags").status_code == 200


def test_timestamps(http, sim) -> None:
    tags = http.get(f"{sim.url}/api/tags").json()["models"]
    assert all(LOCAL_STAMP.match(m["modified_at"]) for m in tags)
    http.post(f"{sim.url}/api/generate", json={"model": "llama3.2", "keep_alive": -1})
    ps = http.get(f"{sim.url}/api/ps").json()["models"]
    assert LOCAL_STAMP.match(ps[0]["expires_at"]) and ps[0]["expires_at"].startswith("23")
    http.post(f"{sim.url}/api/generate", json={"model": "llama3.2", "keep_alive": 0})
    assert http.get(f"{sim.url}/api/ps").json() == {"models": []}


def test_keep_alive_and_pipelining_on_one_connection(sock: socket.socket) -> None:
    request = (
        b'POST /api/show HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n{"model":"llama3.2"}'
    )
    sock.sendall(request + request + b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = ResponseReader(sock)
    for _ in range(2):
        head, body = reader.next()
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert json.loads(body)["capabilities"] == ["completion", "tools"]
    head, body = reader.next()
    assert b"version" in body


def test_expect_continue_and_chunked_request_body(sock: socket.socket, http, sim) -> None:
    body = b'{"model":"llama3.2"}'
    sock.sendall(
        b"POST /api/show HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    sock.sendall(body)
    head, reply = ResponseReader(sock).next()
    assert head.startswith(b"HTTP/1.1 200") and b"details" in reply
    chunked = http.post(f"{sim.url}/api/show", data=iter([b'{"model":', b'"llava:7b"}']))
    assert chunked.json()["capabilities"] == ["completion", "vision"]


def test_connection_close_is_honoured(sock: socket.socket) -> None:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert b"Connection: close" in data and data.endswith(b"Ollama is running")


def test_headers_wait_for_the_first_chunk(sock: socket.socket, sim, admin) -> None:
    """While the server is silent before the first token, not even the status line is sent."""
    admin.set_faults(fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 0}])
    body = b'{"model":"llama3.2","prompt":"wait"}'
    sock.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )
    fault = wait_event(sim.url, lambda e: e["type"] == "fault" and e["fault"] == "stall")
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.close()
    event = wait_event(sim.url, lambda e: e["type"] == "disconnect")
    assert event["request_id"] == fault["request_id"] and event["stage"] == "generating"
    assert admin.stats()["client_disconnects"] == 1


def test_first_byte_delay_holds_the_headers(http, sim, admin) -> None:
    admin.set_faults(first_byte_delay_seconds=0.3)
    with http.post(
        f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x"}, stream=True
    ) as response:
        assert response.elapsed.total_seconds() >= 0.3
        assert json.loads(next(response.iter_lines()))["done"] is False
    assert admin.stats()["faults_injected"] == {"first_byte_delay": 1}


def test_legacy_errors_send_200_and_one_error_line(http, sim, admin) -> None:
    admin.set_faults(legacy_errors=True, fail_next=[{"type": "status", "status": 500}] * 2)
    streamed = http.post(f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x"})
    assert streamed.status_code == 200
    assert streamed.headers["Content-Type"] == "application/x-ndjson"
    assert streamed.text == json.dumps({"error": RUNNER_STOPPED}, separators=(",", ":")) + "\n"
    plain = http.post(
        f"{sim.url}/api/generate", json={"model": "llama3.2", "prompt": "x", "stream": False}
    )
    assert (plain.status_code, plain.json()) == (500, {"error": RUNNER_STOPPED})


def test_modern_pre_first_token_errors_use_the_status(http, sim, admin) -> None:
    admin.set_faults(fail_next=[{"type": "status", "status": 429, "error": "rate limit exceeded"}])
    response = http.post(
        f"{sim.url}/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == {"error": "rate limit exceeded"}


def test_html_characters_are_escaped_like_go(http, sim) -> None:
    response = http.post(f"{sim.url}/api/generate", json={"model": "<b>&", "prompt": "x"})
    assert response.content == b'{"error":"model \'\\u003cb\\u003e\\u0026\' not found"}'
