"""The native /v1 API of the gateway, on a real Redis, a real worker and the simulator."""

from __future__ import annotations

import base64
import io
import re
import time
import uuid

import requests
from PIL import Image
from test_gateway_support import (  # noqa: F401
    GatewayServer,
    gateway_url_fixture,
    read_sse,
    settings_on_db,
)

from producers.client import Client
from tasks.queues import purge_model
from tasks.settings import Settings, load_settings
from tests.conftest import SimControl
from tests.wire_support import announce_idle_worker, offer, wait_until

TIMEOUT = (5, 30)


def png_bytes(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


def submit(url: str, kind: str, payload: dict, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/tasks/{kind}", json=payload, timeout=TIMEOUT, **kwargs)


def test_health_and_readiness(gateway_url: str) -> None:
    assert requests.get(f"{gateway_url}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    assert requests.get(f"{gateway_url}/readyz", timeout=TIMEOUT).json() == {"status": "ready"}


def test_readyz_says_503_without_redis(settings: Settings) -> None:
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with GatewayServer(dead) as server:
        reply = requests.get(f"{server.url}/readyz", timeout=TIMEOUT)
        assert reply.status_code == 503
        assert reply.json()["error"]["type"] == "BrokerUnavailable"
        assert requests.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200


def test_openapi_document_and_docs(gateway_url: str) -> None:
    document = requests.get(f"{gateway_url}/openapi.json", timeout=TIMEOUT).json()
    for kind in ("generate", "chat", "structured", "multimodal"):
        assert f"/v1/tasks/{kind}" in document["paths"]
    assert "/v1/tasks/{task_id}/events" in document["paths"]
    assert document["components"]["schemas"]["GeneratePayload"]["properties"]["prompt"]
    assert "swagger" in requests.get(f"{gateway_url}/docs", timeout=TIMEOUT).text.lower()


def test_docs_pages_load_their_assets_from_the_gateway_itself(gateway_url: str) -> None:
    """/docs and /redoc work offline: every script, style and icon comes from this server."""
    for page in ("/docs", "/redoc"):
        html = requests.get(gateway_url + page, timeout=TIMEOUT).text
        assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert assets and all(a.startswith("/") for a in assets), assets  # no CDN URL
        for asset in assets:
            reply = requests.get(gateway_url + asset, timeout=TIMEOUT)
            assert reply.status_code == 200 and reply.content, asset


def test_last_event_id_is_an_integer_seq(gateway_url: str) -> None:
    document = requests.get(f"{gateway_url}/openapi.json", timeout=TIMEOUT).json()
    parameters = document["paths"]["/v1/tasks/{task_id}/events"]["get"]["parameters"]
    header = next(p for p in parameters if p["name"] == "Last-Event-ID")
    assert header["in"] == "header"
    assert {"type": "integer", "minimum": -1} in header["schema"]["anyOf"]
    body = submit(
        gateway_url,
        "generate",
        {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 2}},
    ).json()
    reply = requests.get(body["events_url"], headers={"Last-Event-ID": "three"}, timeout=TIMEOUT)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "InvalidRequest"
    assert "Last-Event-ID" in reply.json()["error"]["message"]


def test_generate_task_from_submission_to_result(gateway_url: str) -> None:
    reply = submit(gateway_url, "generate", {"model": "llama3.2", "prompt": "Why is the sky blue?"})
    assert reply.status_code == 202, reply.text
    body = reply.json()
    assert body["model"] == "llama3.2:latest" and body["queue"] == "corral.llama3.2:latest"
    assert body["position"] >= 0
    assert reply.headers["X-Corral-Task-Id"] == body["id"]
    assert reply.headers["X-Corral-Queue-Position"] == str(body["position"])
    assert body["status_url"].endswith(f"/v1/tasks/{body['id']}")

    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [e for e in read_sse(stream) if e["event"] != "queued"]  # if it had to wait
    assert [int(e["id"]) for e in events] == list(range(len(events)))
    assert [e["data"]["seq"] for e in events] == list(range(len(events)))
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    text = "".join(e["data"]["text"] for e in events if e["event"] == "token")

    status = requests.get(body["status_url"], timeout=TIMEOUT).json()
    assert status["status"] == "succeeded"
    assert status["result"]["text"] == text and text


def test_sse_resume_with_last_event_id_has_no_gap_and_no_duplicate(gateway_url: str) -> None:
    body = submit(
        gateway_url,
        "chat",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Tell me a long story."}]},
    ).json()
    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as first:
        # its place in line comes first if it had to wait: not a task event (no id)
        head = [e for e in read_sse(first, stop_after=4) if e["event"] != "queued"]
    last = head[-1]["id"]
    with requests.get(
        body["events_url"], headers={"Last-Event-ID": last}, stream=True, timeout=TIMEOUT
    ) as second:
        tail = read_sse(second)
    seqs = [int(e["id"]) for e in head + tail]
    assert seqs == list(range(len(seqs)))
    assert tail[0]["id"] == str(int(last) + 1) and tail[-1]["event"] == "done"
    # ?after= does the same for clients that cannot set headers
    with requests.get(
        body["events_url"], params={"after": last}, stream=True, timeout=TIMEOUT
    ) as third:
        assert [e["id"] for e in read_sse(third)] == [e["id"] for e in tail]


def test_invalid_payload_is_refused_with_the_typed_error(gateway_url: str) -> None:
    reply = submit(
        gateway_url, "generate", {"model": "llama3.2", "prompt": "x", "options": {"temprature": 1}}
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "InvalidRequest" and error["retryable"] is False
    assert "options.temprature" in error["message"]
    assert submit(gateway_url, "chat", {"model": "llama3.2", "messages": []}).status_code == 400
    not_json = requests.post(
        f"{gateway_url}/v1/tasks/generate",
        data=b"{",
        timeout=TIMEOUT,
        headers={"Content-Type": "application/json"},
    )
    assert not_json.status_code == 400


def test_unknown_task_is_404_everywhere(gateway_url: str) -> None:
    for method, suffix in (("GET", ""), ("GET", "/events"), ("DELETE", "")):
        reply = requests.request(
            method, f"{gateway_url}/v1/tasks/no-such-task{suffix}", timeout=TIMEOUT
        )
        assert reply.status_code == 404, (method, suffix)
        assert reply.json()["error"]["type"] == "TaskNotFound"


def test_waiting_on_a_model_no_worker_serves_says_so(gateway_url: str, client: Client) -> None:
    offer(client.redis, ["unserved-notice"])  # on an Ollama host: admitted, and it waits
    body = submit(gateway_url, "generate", {"model": "unserved-notice", "prompt": "hi"}).json()
    expected = "no worker serves corral.unserved-notice:latest"
    assert expected in body["warning"]
    status = requests.get(body["status_url"], timeout=TIMEOUT).json()
    assert status["status"] == "queued" and expected in status["warning"]
    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as stream:
        seen = read_sse(stream, stop_after=2)  # its place in line first (a queued event)
    first = next(e for e in seen if e["event"] == "warning")
    assert "id" not in first  # not a task event: no seq
    assert "corral worker --model unserved-notice:latest" in first["data"]["message"]
    requests.delete(body["status_url"], timeout=TIMEOUT)
    served = submit(gateway_url, "generate", {"model": "llama3.2", "prompt": "hi"}).json()
    assert "warning" not in served


def test_cancel_a_queued_task_ends_its_event_stream(gateway_url: str, client: Client) -> None:
    offer(client.redis, ["unserved-cancel"])  # a host has it, no worker serves it: it waits
    body = submit(gateway_url, "generate", {"model": "unserved-cancel", "prompt": "hi"}).json()
    assert requests.get(body["status_url"], timeout=TIMEOUT).json()["status"] == "queued"
    reply = requests.delete(body["status_url"], timeout=TIMEOUT)
    assert reply.json()["state"] == "cancelled" and reply.json()["id"] == body["id"]
    assert reply.json()["ended"] is False
    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as stream:
        events = read_sse(stream)
    assert [e["event"] for e in events] == ["cancelled"]
    status = requests.get(body["status_url"], timeout=TIMEOUT).json()
    assert status["status"] == "cancelled" and status["error"]["type"] == "TaskCancelled"


def test_queues_show_depth_and_workers(gateway_url: str, client: Client) -> None:
    announce_idle_worker(client.redis, "idle-depth", slots=3)  # released there, and left
    submit(gateway_url, "generate", {"model": "idle-depth", "prompt": "hi"})
    client.releaser.for_model("idle-depth")  # as that worker's timer would (no process runs it)
    data = requests.get(f"{gateway_url}/v1/queues", timeout=TIMEOUT).json()
    by_model = {q["model"]: q for q in data["queues"]}
    assert by_model["llama3.2:latest"]["workers"] >= 1 and by_model["llama3.2:latest"]["slots"] >= 1
    assert by_model["idle-depth:latest"]["waiting"] >= 1
    assert (by_model["idle-depth:latest"]["workers"], by_model["idle-depth:latest"]["slots"]) == (
        1,
        3,
    )
    assert any("corral.llava:7b" in w["queues"] and w["ollama_host"] for w in data["workers"])


def test_queues_leave_out_an_empty_queue_nobody_serves(
    gateway_url: str, client: Client, settings: Settings
) -> None:
    offer(client.redis, ["unserved-purged"])  # a host has it, no worker serves it: it waits
    body = submit(gateway_url, "generate", {"model": "unserved-purged", "prompt": "hi"}).json()

    def listed() -> dict:
        data = requests.get(f"{gateway_url}/v1/queues", timeout=TIMEOUT).json()
        return {q["model"]: q for q in data["queues"]}

    assert purge_model(client.redis, client.backend, "unserved-purged", settings).ended == [
        body["id"]
    ]
    queues = listed()
    assert "unserved-purged:latest" not in queues
    assert queues["llama3.2:latest"]["workers"] >= 1  # served: shown, empty or not
    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as stream:
        events = read_sse(stream)
    assert [(e["event"], e["data"]["reason"]) for e in events] == [("cancelled", "queue purged")]
    status = requests.get(body["status_url"], timeout=TIMEOUT).json()
    assert status["status"] == "cancelled" and status["error"]["message"] == "queue purged"


def test_image_as_base64_json_and_as_multipart(gateway_url: str, client: Client) -> None:
    image = png_bytes()
    as_json = submit(
        gateway_url,
        "multimodal",
        {
            "model": "llava:7b",
            "prompt": "What is this?",
            "images": [base64.b64encode(image).decode()],
        },
    )
    assert as_json.status_code == 202, as_json.text
    as_form = requests.post(
        f"{gateway_url}/v1/tasks/multimodal",
        data={"model": "llava:7b", "prompt": "What is this?", "options": '{"temperature": 0}'},
        files=[("images", ("red.png", image, "image/png"))],
        timeout=TIMEOUT,
    )
    assert as_form.status_code == 202, as_form.text
    for reply in (as_json, as_form):
        result = client.job(reply.json()["id"]).result(timeout=30)
        assert result.text
    not_an_image = requests.post(
        f"{gateway_url}/v1/tasks/multimodal",
        data={"model": "llava:7b", "prompt": "?"},
        files=[("images", ("x.png", b"not a picture", "image/png"))],
        timeout=TIMEOUT,
    )
    assert not_an_image.status_code == 400
    assert not_an_image.json()["error"]["field"].startswith("images")


def test_a_path_is_never_read_as_an_image(gateway_url: str) -> None:
    reply = submit(
        gateway_url, "multimodal", {"model": "llava:7b", "prompt": "?", "images": ["/etc/hostname"]}
    )
    assert reply.status_code == 400 and "base64" in reply.json()["error"]["message"]


def test_backpressure_answers_429_with_retry_after(settings: Settings) -> None:
    isolated = settings_on_db(settings.redis_url, 13)
    bounded = load_settings(redis_url=isolated.redis_url, max_queue_depth=2)
    with GatewayServer(bounded) as server, Client(settings=bounded) as sdk:
        sdk.redis.flushdb()
        offer(sdk.redis, ["unserved-backpressure"])
        payload = {"model": "unserved-backpressure", "prompt": "hi"}
        assert [submit(server.url, "generate", payload).status_code for _ in range(2)] == [202] * 2
        refused = submit(server.url, "generate", payload)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "QueueFull"
        assert refused.headers["Retry-After"] == "60"  # nobody serves it: look again later
        announce_idle_worker(sdk.redis, "unserved-backpressure")  # served now, still full

        def facade_call() -> list[requests.Response]:  # it reads the workers once a second
            reply = requests.post(f"{server.url}/api/generate", json=payload, timeout=TIMEOUT)
            return [] if reply.status_code == 404 else [reply]  # (a 429 Response is falsy)

        [facade] = wait_until(facade_call, timeout_s=10, what="the facade to see the worker")
        assert facade.status_code == 429 and int(facade.headers["Retry-After"]) >= 1
        assert "full" in facade.json()["error"]
        sdk.redis.flushdb()


def test_a_second_delete_reports_how_the_task_ended(
    gateway_url: str, sim: SimControl, client: Client
) -> None:
    # The stall is aimed at this request's prompt: a request left over from an earlier test
    # can neither take it first nor be stalled in its place.
    prompt = f"Go on. [{uuid.uuid4().hex}]"
    sim.faults(
        fail_next=[{"type": "stall", "seconds": 60, "after_tokens": 2, "prompt_contains": prompt}]
    )
    body = submit(gateway_url, "generate", {"model": "llama3.2", "prompt": prompt}).json()
    with requests.get(body["events_url"], stream=True, timeout=TIMEOUT) as stream:
        # start, then text: generating, and stalled after two tokens (which may share an event)
        events = read_sse(stream, stop_after=2)
    assert [e["event"] for e in events] == ["start", "token"], events
    first = requests.delete(body["status_url"], timeout=TIMEOUT).json()
    assert first["state"] == "running" and first.get("ended") is not True
    deadline = time.monotonic() + 30  # the worker stores its outcome after the event
    while client.backend.get_task_meta(body["id"])["status"] != "FAILURE":
        assert time.monotonic() < deadline, "the worker never stored the outcome"
        time.sleep(0.05)
    second = requests.delete(body["status_url"], timeout=TIMEOUT).json()
    status = requests.get(body["status_url"], timeout=TIMEOUT).json()
    assert status["status"] == "cancelled"
    assert status["error"]["message"] == "cancelled while calling Ollama"
    assert second == {
        "id": body["id"],
        "state": "cancelled",
        "ended": True,
        "detail": "already cancelled; nothing to cancel",
    }
