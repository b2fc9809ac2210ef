"""The Grafana dashboard: Grafana's schema, PromQL that Prometheus parses, and metrics that a
running exporter really serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitoring.processes import Background, start_exporter
from producers import Client
from tasks.errors import ModelNotFound, OllamaRunnerError, TaskCancelled
from tasks.lifecycle import remove_dead_letter
from tests.dashboard_schema import dashboard_problems
from tests.test_contract import png
from tests.test_prometheus import promtool
from tests.wire_support import wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "corral.json"
WAIT_S = 60
# Grafana's built-in interval variables, as Grafana fills them in before it sends a query.
BUILTIN = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every panel's PromQL, by ``panel <id> <refId>``."""
    return {
        f"panel {p['id']} {t['refId']}": t["expr"]
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    }


def as_prometheus_sees_it(expr: str, dashboard: dict[str, Any]) -> str:
    """``expr`` with the dashboard's variables replaced as Grafana does (``All``: allValue)."""
    for name, value in BUILTIN.items():
        expr = expr.replace(name, value)
    for variable in dashboard["templating"]["list"]:
        value = variable.get("allValue") or ".*"
        expr = re.sub(rf"\$\{{{variable['name']}\}}|\${variable['name']}\b", value, expr)
    assert "$" not in expr, f"an unknown variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The series a query selects, as Prometheus stores them (``_bucket``, ``_total``...)."""
    return set(re.findall(r"\bcorral_[\w:]+", re.sub(r'"[^"]*"', '""', expr)))


# -- the schema -----------------------------------------------------------------------------
def test_dashboard_conforms_to_grafanas_dashboard_schema(dashboard: dict[str, Any]) -> None:
    assert dashboard_problems(dashboard) == []


def test_the_schema_check_catches_what_grafana_would_not_take(dashboard: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(dashboard))
    broken["graphTooltip"] = 7
    broken["panels"][0]["gridPos"]["x"] = "4"
    broken["panels"][1]["titel"] = "typo"
    timeseries = next(p for p in broken["panels"] if p["type"] == "timeseries")
    timeseries["options"]["legend"]["displayMode"] = "tabel"
    problems = "\n".join(dashboard_problems(broken))
    for expected in ("graph_tooltip", "grid_pos.x", "titel", "display_mode"):
        assert expected in problems, problems


def test_panels_are_laid_out_on_grafanas_grid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "two panels share an id"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


# -- PromQL ---------------------------------------------------------------------------------
def test_every_panel_query_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    queries = panel_queries(dashboard)
    assert len(queries) >= 20
    rules = [
        {
            "record": "dashboard:" + name.replace(" ", "_"),
            "expr": as_prometheus_sees_it(e, dashboard),
        }
        for name, e in queries.items()
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = promtool("check", "rules", path)
    assert f"{len(rules)} rules found" in run.stdout + run.stderr


def test_a_query_prometheus_cannot_parse_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.yml"
    rule = {"record": "dashboard:broken", "expr": "sum by (model (corral_queue_messages)"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "broken", "rules": [rule]}]}))
    with pytest.raises(AssertionError, match="parse error"):
        promtool("check", "rules", path)


# -- metrics, against a live exporter -------------------------------------------------------
@pytest.fixture(scope="module")
def exporter(redis_url: str, worker) -> Iterator[Background]:
    child = start_exporter(redis_url, extra=["--cache-seconds", "0.2", "--ps-interval", "0.3"])
    yield child
    child.stop()


def exported(exporter: Background) -> set[str]:
    """The sample names of one scrape (``_bucket``, ``_total``... as Prometheus stores them)."""
    reply = requests.get(exporter.url + "/metrics", timeout=10)
    reply.raise_for_status()
    return {s.name for f in text_string_to_metric_families(reply.text) for s in f.samples}


def work_of_every_kind(client: Client, sim) -> None:
    """A task of each kind, a failure, a retry, a dead letter and a cancellation."""
    short = {"num_predict": 8}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.generate("llama3.2", "Hi", options=short).result(timeout=WAIT_S)
    client.chat("deepseek-r1:14b", [{"role": "user", "content": "Hi"}], options=short).result(
        timeout=WAIT_S
    )
    client.structured("llama3.2", schema, prompt="One.").result(timeout=WAIT_S)
    client.multimodal("llava:7b", "What?", [png(8, 8)], options=short).result(timeout=WAIT_S)
    client.embed("all-minilm", ["a", "b"]).result(timeout=WAIT_S)
    with pytest.raises(ModelNotFound):
        client.generate("ghost-model", "Hi").result(timeout=WAIT_S)
    crash = {"type": "crash_after", "tokens": 2, "model": "llama3.2"}
    sim.faults(fail_next=[crash])  # one crash, then the retry succeeds
    client.generate("llama3.2", "Again", options=short).result(timeout=WAIT_S)
    sim.faults(fail_next=[crash] * 3)  # every attempt crashes: a dead letter
    doomed = client.generate("llama3.2", "Doomed", options=short)
    with pytest.raises(OllamaRunnerError):
        doomed.result(timeout=WAIT_S)
    remove_dead_letter(client.redis, doomed.id)
    long = client.generate("llama3.2", "A long story", options={"num_predict": 100_000})
    stream = long.text_stream(timeout=WAIT_S)
    next(stream)  # running
    long.cancel()
    with pytest.raises(TaskCancelled):
        for _ in stream:
            pass


def test_every_metric_a_panel_uses_is_exported(
    dashboard: dict[str, Any],
    exporter: Background,
    client: Client,
    sim,
    waiting_model: tuple[str, int],
) -> None:
    """After work of every kind, with tasks waiting, every series a panel reads exists."""
    used = {name for e in panel_queries(dashboard).values() for name in metric_names(e)}
    for variable in dashboard["templating"]["list"]:
        used |= set(re.findall(r"\bcorral_\w+", variable["query"]["query"]))
    assert len(used) >= 20 and "corral_task_duration_seconds_bucket" in used, used
    work_of_every_kind(client, sim)

    try:
        wait_until(lambda: used <= exported(exporter), WAIT_S, "every series a panel uses")
    except AssertionError:
        missing = sorted(used - exported(exporter))
        raise AssertionError(f"panels query series the exporter lacks: {missing}") from None
