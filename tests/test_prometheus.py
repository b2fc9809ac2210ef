"""The Prometheus files, checked by the real ``promtool`` and served by the real ``prometheus``.

``make test`` installs both from Debian (package ``prometheus``) when it runs as root; without
them these tests are skipped and say so. The server listens on a free port of its own with a
temporary data directory, so a Prometheus already running on 9090 changes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from monitoring.processes import Background, start_exporter
from tasks.keys import queue_name
from workers.embedded_redis import free_port
from workers.processes import Child

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "monitoring" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
WAIT_S = 30.0


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package `prometheus`; `make test` as root)")
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """``promtool ARGS``; the test fails with promtool's own words when it refuses."""
    run = subprocess.run(
        [binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{run.stdout}{run.stderr}"
    return run


def alert_names() -> set[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


# -- promtool -------------------------------------------------------------------------------
def test_promtool_accepts_the_compose_config_and_its_rule_file() -> None:
    run = promtool("check", "config", CONFIG)
    assert "1 rule files found" in run.stdout + run.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    run = promtool("check", "rules", ALERTS)
    assert f"{len(alert_names())} rules found" in run.stdout + run.stderr


def test_every_alert_fires_and_stays_quiet_in_its_unit_tests() -> None:
    promtool("test", "rules", ALERT_TESTS)
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert fired == alert_names(), "an alert without a test that makes it fire"
    assert quiet == alert_names(), "an alert without a test that keeps it quiet"


# -- a real server scraping a real exporter -----------------------------------------------------
@pytest.fixture
def exporter(redis_url: str) -> Iterator[Background]:
    child = start_exporter(
        redis_url, extra=["--cache-seconds", "0.2", "--discover-interval", "0.3"]
    )
    yield child
    child.stop()


def server_config(exporter_url: str, workdir: Path) -> Path:
    """The compose config, with the exporter's real address and one-second intervals."""
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "corral-exporter"]
    jobs[0]["static_configs"] = [{"targets": [exporter_url.removeprefix("http://")]}]
    config["scrape_configs"] = jobs  # Flower is not running here
    shutil.copy(ALERTS, workdir / ALERTS.name)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(exporter: Background, tmp_path: Path) -> Iterator[str]:
    """The real server on a free port; its URL once /-/ready answers."""
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    argv = [
        binary("prometheus"),
        f"--config.file={server_config(exporter.url, tmp_path)}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True
        )
    child = Child(process, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        poll(lambda: ready(child, url), "prometheus to be ready")
        yield url
    finally:
        child.stop()


def ready(child: Child, url: str) -> bool:
    if not child.alive():
        raise AssertionError(f"prometheus exited:\n{child.log_tail()}")
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def poll(check: Any, what: str) -> Any:
    """Poll the server's real state until ``check`` answers something truthy."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if answer := check():
            return answer
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def api(url: str, path: str, **params: str) -> Any:
    reply = requests.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_true_queue_depth_and_loads_the_alerts(
    waiting_model: tuple[str, int], prometheus: str
) -> None:
    model, depth = waiting_model
    query = f'corral_queue_messages{{model="{model}"}}'

    def scraped() -> list[dict[str, Any]]:
        return api(prometheus, "query", query=query)["result"]

    series = poll(scraped, f"{query} in Prometheus")
    assert len(series) == 1
    assert series[0]["metric"]["queue"] == queue_name(model)
    assert float(series[0]["value"][1]) == depth
    (target,) = api(prometheus, "targets")["activeTargets"]
    assert target["labels"]["job"] == "corral-exporter" and target["health"] == "up"

    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == alert_names()
    assert all(r["health"] in ("ok", "unknown") for r in rules), rules

    def no_worker_alert() -> list[dict[str, Any]]:
        alerts = api(prometheus, "alerts")["alerts"]
        return [
            a
            for a in alerts
            if a["labels"]["alertname"] == "CorralQueueWithoutWorkers"
            and a["labels"].get("model") == model
        ]

    (alert,) = poll(no_worker_alert, "CorralQueueWithoutWorkers to be pending")
    assert alert["state"] == "pending"  # `for: 2m` has not passed
