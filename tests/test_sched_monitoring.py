"""What operators see of the scheduler's pending work: the exporter, Flower, the CLI, /v1/queues.

Tasks wait in the scheduler of a database of their own (tests/sched_support.py); the tests
release, start and switch hosts with the scheduler's own calls, so every count is exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sched_support import HOST, MODEL, admit_task, sdk_fixture, wait_until  # noqa: F401
from test_gateway_support import GatewayServer
from test_monitoring import sample_values, value

from monitoring.metrics import top_tenants
from monitoring.processes import Background, start_exporter, start_flower
from producers import Client
from tasks.keys import KOMBU_BINDING_PREFIX, queue_name
from tasks.queues import index_existing, queue_overview
from tasks.scheduler import Scheduler
from tasks.scheduler.lua import WAIT_BUCKETS_S

OTHER_MODEL = "views-other:latest"
AUTH = ("ops", "s3cret")
TIMEOUT = (5, 30)


@pytest.fixture
def backlog(sdk: Client) -> Scheduler:
    """MODEL: 2 tasks of tenant "small" at priority 9, 5 of "big" at 0, and one each of t1-t4
    at 5; the two urgent ones are released and started (their waits are counted), and the host
    is switched to MODEL. OTHER_MODEL: one pending task."""
    sched = Scheduler(sdk.redis, sdk.settings)
    sched.finished("earlier", MODEL, run_s=3.0)
    for _ in range(5):
        admit_task(sdk, tenant="big", priority=0)
    for tenant in ("t1", "t2", "t3", "t4"):
        admit_task(sdk, tenant=tenant, priority=5)
    urgent = [admit_task(sdk, tenant="small", priority=9) for _ in range(2)]
    admit_task(sdk, model=OTHER_MODEL)
    step = sched.release_for_host(HOST, [MODEL], 2)
    assert (step.model, step.task_ids) == (MODEL, [job.id for job in urgent])
    for job in urgent:
        assert sched.started(job.id)
    return sched


def test_top_tenants_keep_the_label_bounded() -> None:
    counts = {"a": 5, "b": 9, "c": 1, "other": 2, "d": 0}
    assert top_tenants(counts, 2) == [("b", 9), ("a", 5), ("other", 3)]
    assert top_tenants(counts, 10) == [("b", 9), ("a", 5), ("c", 1), ("other", 2)]
    assert top_tenants({"a": 1}, 1) == [("a", 1)]


@pytest.fixture
def exporter(sdk: Client) -> Iterator[Background]:
    child = start_exporter(
        sdk.settings.redis_url,
        extra=["--cache-seconds", "0", "--discover-interval", "0", "--top-tenants", "3"],
    )
    yield child
    child.stop()


def test_exporter_shows_pending_work_waits_tenants_and_switches(
    sdk: Client, backlog: Scheduler, exporter: Background
) -> None:
    text = requests.get(exporter.url + "/metrics", timeout=TIMEOUT).text
    samples = sample_values(text)
    queue = {"model": MODEL, "queue": queue_name(MODEL)}
    # The whole backlog: two released to Celery's queue, nine pending.
    assert sdk.redis.llen(queue_name(MODEL)) == 2
    assert value(samples, "corral_queue_messages", **queue) == 11
    assert value(samples, "corral_queue_oldest_message_age_seconds", **queue) > 0
    assert (
        value(samples, "corral_queue_messages", model=OTHER_MODEL, queue=queue_name(OTHER_MODEL))
        == 1
    )
    pending = {
        band: value(samples, "corral_scheduler_pending_tasks", model=MODEL, priority=str(band))
        for band in range(10)
    }
    assert pending == {0: 5, 1: 0, 2: 0, 3: 0, 4: 0, 5: 4, 6: 0, 7: 0, 8: 0, 9: 0}
    assert value(samples, "corral_scheduler_running_tasks", model=MODEL) == 2
    assert value(samples, "corral_scheduler_released_tasks", model=MODEL) == 0
    assert value(samples, "corral_scheduler_service_seconds", model=MODEL) == 3.0
    assert value(samples, "corral_scheduler_oldest_wait_seconds", model=MODEL) > 0
    tenants = {
        dict(labels)["tenant"]: n
        for (name, labels), n in samples.items()
        if name == "corral_scheduler_tenant_pending_tasks" and dict(labels)["model"] == MODEL
    }
    assert tenants == {"big": 5, "t1": 1, "t2": 1, "other": 2}  # top 3 by depth, then name
    assert value(samples, "corral_scheduler_wait_seconds_count", priority="9") == 2
    assert value(samples, "corral_scheduler_wait_seconds_bucket", priority="9", le="+Inf") == 2
    last = repr(float(WAIT_BUCKETS_S[-1]))
    assert value(samples, "corral_scheduler_wait_seconds_bucket", priority="9", le=last) == 2
    assert value(samples, "corral_scheduler_wait_seconds_sum", priority="9") >= 0
    assert value(samples, "corral_scheduler_model_switches_total", host=HOST) == 1
    assert value(samples, "corral_scheduler_host_model", host=HOST, model=MODEL) == 1


def test_flower_counts_the_pending_work(sdk: Client, backlog: Scheduler, tmp_path: Path) -> None:
    child = start_flower(
        sdk.settings.redis_url, basic_auth=":".join(AUTH), log_path=tmp_path / "flower.log"
    )
    try:

        def lengths() -> dict[str, int]:
            page = requests.get(child.url + "/api/queues/length", auth=AUTH, timeout=TIMEOUT)
            return {q["name"]: q["messages"] for q in page.json()["active_queues"]}

        found = wait_until(
            lambda: queue_name(OTHER_MODEL) in lengths() and lengths(),
            timeout_s=15,
            what="the model queues in Flower",
        )
        assert found[queue_name(MODEL)] == 11  # type: ignore[index]
        assert found[queue_name(OTHER_MODEL)] == 1  # type: ignore[index]
        html = requests.get(child.url + "/broker", auth=AUTH, timeout=TIMEOUT).text
        row = html[html.index(queue_name(MODEL)) :]
        assert ">11</td>" in row[: row.index("</tr>")]
    finally:
        child.stop()


def corral(client: Client, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_REDIS_URL": client.settings.redis_url}
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
    )


def test_corral_queues_and_status_show_pending_work_by_priority(
    sdk: Client, backlog: Scheduler
) -> None:
    rows = {r["model"]: r for r in json.loads(corral(sdk, "queues", "--json").stdout)}
    row = rows[MODEL]
    assert (row["waiting"], row["pending"], row["running"]) == (11, 9, 2)
    assert row["by_priority"] == {"5": 4, "0": 5}
    assert row["workers"] == 1 and row["slots"] == 2  # the announcement of sched_support
    table = corral(sdk, "queues").stdout
    assert "BY PRIORITY" in table and "5:4 0:5" in table
    assert HOST in table and "MODEL SWITCHES" in table
    line = next(line for line in table.splitlines() if line.startswith(HOST))
    assert line.split()[1:2] == [MODEL] and line.split()[-1] == "1"
    status = json.loads(corral(sdk, "status", "--json").stdout)
    [host] = status["ollama_hosts"]
    assert (host["host"], host["serving"], host["model_switches"]) == (HOST, MODEL, 1)
    assert {q["model"]: q["pending"] for q in status["queues"]}[OTHER_MODEL] == 1
    assert "SCHEDULED FOR" in corral(sdk, "status").stdout


def test_v1_queues_shows_pending_work_and_hosts(sdk: Client, backlog: Scheduler) -> None:
    with GatewayServer(sdk.settings) as server:
        data = requests.get(server.url + "/v1/queues", timeout=TIMEOUT).json()
    row = next(q for q in data["queues"] if q["model"] == MODEL)
    assert (row["waiting"], row["pending"], row["running"]) == (11, 9, 2)
    assert row["by_priority"] == {"0": 5, "5": 4} and row["oldest_wait_s"] >= 0
    assert data["hosts"] == [
        {
            "host": HOST,
            "model": MODEL,
            "since": pytest.approx(data["hosts"][0]["since"]),
            "switches": 1,
        }
    ]


def test_a_queue_outside_the_model_grammar_still_lists(sdk: Client) -> None:
    """A queue declared by hand (e.g. through Flower) under a name no model has: once the
    exporter's start-up scan indexed it, listed with its messages and an empty backlog, not
    refused."""
    odd = "corral.Odd Queue"
    sdk.redis.lpush(odd, "{}")
    sdk.redis.sadd(KOMBU_BINDING_PREFIX + odd, "binding")
    assert odd not in {row.queue for row in queue_overview(sdk.redis, [], sdk.settings)}
    index_existing(sdk.redis)
    rows = {row.queue: row for row in queue_overview(sdk.redis, [], sdk.settings)}
    assert (rows[odd].waiting, rows[odd].pending) == (1, 0)
