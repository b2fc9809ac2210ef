"""API keys, model allow-lists, per-key limits, the IP allow-list and the bind rule.

Each test runs its own gateway on another Redis database, so the keys made here never reach
the other tests (a gateway with keys demands one on every call).
"""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import pytest
import redis
import requests
from click.testing import CliRunner
from test_gateway_support import GatewayServer, settings_on_db

from producers.gateway import GatewayConfig
from producers.gateway.auth import create_key, list_keys, revoke_key
from producers.gateway.commands import gateway as gateway_command
from producers.gateway.commands import keys as keys_command
from tasks.keys import SCHED_WEIGHTS_KEY, task_key
from tasks.settings import Settings
from tests.wire_support import offer

TIMEOUT = (5, 30)
DB = 12


@pytest.fixture
def keyed(settings: Settings) -> Iterator[tuple[Settings, redis.Redis]]:
    isolated = settings_on_db(settings.redis_url, DB)
    client = redis.Redis.from_url(isolated.redis_url)
    client.flushdb()
    offer(client, ["unserved-auth"])  # a host has it, no worker serves it: admitted, waits
    yield isolated, client
    client.flushdb()
    client.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def submit(url: str, token: str | None, model: str = "unserved-auth") -> requests.Response:
    return requests.post(
        f"{url}/v1/tasks/generate",
        json={"model": model, "prompt": "hi"},
        headers=bearer(token) if token else {},
        timeout=TIMEOUT,
    )


def test_keys_are_stored_only_as_hashes(keyed: tuple[Settings, redis.Redis]) -> None:
    _, client = keyed
    token, record = create_key(client, "billing", models=["llama3.2"])
    assert token.startswith(f"crl_{record.id}_") and record.models == ["llama3.2:latest"]
    dump = b"".join(client.dump(k) or b"" for k in client.keys("*"))
    assert token.encode() not in dump and token.split("_", 2)[2].encode() not in dump
    assert [k.id for k in list_keys(client)] == [record.id]
    assert revoke_key(client, record.id) and not list_keys(client)


def test_401_403_and_a_working_key(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, client = keyed
    token, _ = create_key(client, "svc", models=["unserved-auth"])
    with GatewayServer(settings) as server:
        missing = submit(server.url, None)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "Unauthorized"
        assert submit(server.url, "crl_nope_nope").status_code == 401
        assert submit(server.url, token).status_code == 202
        other = submit(server.url, token, model="llama3.2")
        assert other.status_code == 403 and other.json()["error"]["type"] == "ModelNotAllowed"
        # the facade answers in Ollama's shape, and the official client sends the key
        facade = requests.post(
            f"{server.url}/api/generate",
            json={"model": "llama3.2", "prompt": "x"},
            headers=bearer(token),
            timeout=TIMEOUT,
        )
        assert facade.status_code == 403 and isinstance(facade.json()["error"], str)
        with ollama.Client(host=server.url) as anonymous, pytest.raises(ollama.ResponseError) as e:
            anonymous.generate(model="unserved-auth", prompt="x")
        assert e.value.status_code == 401
        assert requests.get(f"{server.url}/healthz", timeout=TIMEOUT).status_code == 200
        revoke_key(client, token.split("_")[1])
        assert submit(server.url, token).status_code == 401


def test_rate_limit_429_with_retry_after(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, client = keyed
    token, _ = create_key(client, "chatty", rate_per_minute=3)
    with GatewayServer(settings) as server:
        answers = [
            requests.get(f"{server.url}/v1/queues", headers=bearer(token), timeout=TIMEOUT)
            for _ in range(4)
        ]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert 1 <= int(answers[-1].headers["Retry-After"]) <= 60
    assert answers[-1].json()["error"]["type"] == "RateLimited"


def test_tasks_in_flight_limit(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, client = keyed
    token, _ = create_key(client, "bulk", max_in_flight=2)
    with GatewayServer(settings) as server:
        first, second = submit(server.url, token), submit(server.url, token)
        assert (first.status_code, second.status_code) == (202, 202)
        third = submit(server.url, token)
        assert third.status_code == 429 and third.json()["error"]["type"] == "TooManyInFlight"
        assert "Retry-After" in third.headers
        requests.delete(first.json()["status_url"], headers=bearer(token), timeout=TIMEOUT)
        assert submit(server.url, token).status_code == 202  # a finished task frees its place


def test_a_key_sees_only_its_own_tasks(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, client = keyed
    owner, _ = create_key(client, "team-a")
    stranger, _ = create_key(client, "team-b")
    with GatewayServer(settings) as server:
        accepted = submit(server.url, owner).json()
        status_url, events_url = accepted["status_url"], accepted["events_url"]
        for method, url in (("GET", status_url), ("GET", events_url), ("DELETE", status_url)):
            foreign = requests.request(method, url, headers=bearer(stranger), timeout=TIMEOUT)
            assert foreign.status_code == 404, (method, url)
            assert foreign.json()["error"]["type"] == "TaskNotFound"
        mine = requests.get(status_url, headers=bearer(owner), timeout=TIMEOUT)
        assert mine.status_code == 200 and mine.json()["status"] == "queued"
        cancelled = requests.delete(status_url, headers=bearer(owner), timeout=TIMEOUT)
        assert cancelled.json()["state"] == "cancelled"


def test_a_key_is_a_tenant_with_a_weight_and_a_priority_cap(
    keyed: tuple[Settings, redis.Redis],
) -> None:
    settings, client = keyed
    token, key = create_key(client, "batch", weight=2, max_priority=4)
    assert client.hget(SCHED_WEIGHTS_KEY, key.tenant) == b"2.0"  # the scheduler's weight
    with GatewayServer(settings) as server:

        def submitted(**extra: object) -> dict[bytes, bytes]:
            body = {"model": "unserved-auth", "prompt": "hi", **extra}
            reply = requests.post(
                f"{server.url}/v1/tasks/generate", json=body, headers=bearer(token), timeout=TIMEOUT
            )
            assert reply.status_code == 202, reply.text
            return client.hgetall(task_key(reply.json()["id"]))

        capped = submitted(priority=9)
        assert (capped[b"priority"], capped[b"tenant"]) == (b"4", key.id.encode())
        assert submitted()[b"priority"] == b"4"  # the default 5, capped too
        assert submitted(priority=1)[b"priority"] == b"1"
        bad = requests.post(
            f"{server.url}/v1/tasks/generate",
            headers=bearer(token),
            json={"model": "unserved-auth", "prompt": "hi", "priority": "high"},
            timeout=TIMEOUT,
        )
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "priority"
    assert revoke_key(client, key.id) and not client.hexists(SCHED_WEIGHTS_KEY, key.tenant)


def test_ip_allow_list(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, _ = keyed
    with GatewayServer(settings, GatewayConfig(ip_allow="10.0.0.0/8")) as server:
        reply = requests.get(f"{server.url}/v1/queues", timeout=TIMEOUT)
        assert reply.status_code == 403
    with GatewayServer(settings, GatewayConfig(ip_allow="10.0.0.0/8, 127.0.0.1/32")) as server:
        assert requests.get(f"{server.url}/v1/queues", timeout=TIMEOUT).status_code == 200


def test_require_auth_holds_even_without_keys(keyed: tuple[Settings, redis.Redis]) -> None:
    settings, _ = keyed
    with GatewayServer(settings, require_auth=True) as server:
        assert submit(server.url, None).status_code == 401


def test_keys_commands_and_the_bind_rule(
    keyed: tuple[Settings, redis.Redis], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, client = keyed
    monkeypatch.setenv("CORRAL_REDIS_URL", settings.redis_url)
    runner = CliRunner()
    refused = runner.invoke(gateway_command, ["--host", "0.0.0.0", "--port", "1"])
    assert refused.exit_code != 0 and "without any API key" in refused.output
    made = runner.invoke(
        keys_command,
        [
            "create",
            "ops",
            "--model",
            "llama3.2",
            "--rpm",
            "5",
            "--weight",
            "3",
            "--max-priority",
            "7",
            "--user-tenants",
        ],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    listed = runner.invoke(keys_command, ["list"])
    key_id = token.split("_")[1]
    assert key_id in listed.output and "llama3.2:latest" in listed.output
    assert "weight=3 max-priority=7 user-tenants" in listed.output
    assert [k.user_tenants for k in list_keys(client)] == [True]
    assert token.split("_", 2)[2] not in listed.output
    assert runner.invoke(keys_command, ["revoke", key_id]).exit_code == 0
    assert runner.invoke(keys_command, ["revoke", key_id]).exit_code == 1
    assert not list_keys(client)
