"""The deployment files, checked without a Docker engine (there is none on these machines).

What can be known here is checked: the compose file parses, every command it runs exists in the
project image (console scripts and their subcommands and options), its environment names are
real settings, every service has a healthcheck, the mounted Prometheus/Grafana files exist and
query only metrics the exporter exports, and the Dockerfile is multi-stage and non-root.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from flower.options import options as flower_options
from prometheus_client import CollectorRegistry

from monitoring.metrics import StateCollector, TaskMetrics
from monitoring.snapshot import Snapshot
from tasks.keys import canonical_model
from tasks.settings import Settings, load_settings
from workers.launcher import default_node_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
ENV = {"REDIS_PASSWORD": "pw", "FLOWER_BASIC_AUTH": "ops:pw", "GRAFANA_ADMIN_PASSWORD": "pw"}
IMAGE_SCRIPTS = {"corral", "celery", "python"}  # console scripts of the image, and its Python


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (enough for this file)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name} is required: {arg}")
        return arg or ""

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), ENV)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def project_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        n: s for n, s in services.items() if str(s.get("image", "")).startswith("ollama-corral")
    }


def worker_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in project_services(services).items() if s["command"][1] == "worker"}


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    TaskMetrics.create(registry)
    names = {m.name for m in registry.collect()}
    empty = Snapshot(0.0, [], 0, 0, [], 0.0, 0)
    names |= {m.name for m in StateCollector(lambda: empty, lambda: []).collect()}
    return names


def metrics_in(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in re.findall(r"\bcorral_\w+", expr)}


# -- compose ------------------------------------------------------------------------------
def test_compose_parses_and_requires_its_secrets() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    for name in ENV:
        with pytest.raises(KeyError, match=name):
            interpolate(raw, {k: v for k, v in ENV.items() if k != name})
    docs = (ROOT / "docs" / "operations.md").read_text()
    assert all(name in docs for name in ENV), "docs/operations.md must name every secret"


def test_services_and_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    expected = {"redis", "ollama", "ollama-pull", "flower", "exporter", "prometheus", "grafana"}
    assert expected <= set(services)
    assert len(worker_services(services)) >= 2
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"


def test_redis_is_persistent_and_password_protected(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1] == ENV["REDIS_PASSWORD"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for service in project_services(services).values():
        url = service["environment"]["CORRAL_REDIS_URL"]
        assert url == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"


def test_ollama_keeps_models_and_pulls_before_workers(services: dict[str, dict[str, Any]]) -> None:
    assert services["ollama"]["image"].startswith("ollama/ollama")
    assert any(v.endswith(":/root/.ollama") for v in services["ollama"]["volumes"])
    pull = services["ollama-pull"]
    assert pull["restart"] == "no" and "ollama pull" in " ".join(pull["command"])
    assert pull["depends_on"]["ollama"]["condition"] == "service_healthy"
    pulled = set(pull["environment"]["PULL_MODELS"].split())
    served = set()
    for name, worker in worker_services(services).items():
        assert worker["depends_on"]["ollama-pull"]["condition"] == "service_completed_successfully"
        assert "container_name" not in worker and "ports" not in worker, f"{name} cannot scale"
        model = worker["command"][worker["command"].index("--model") + 1]
        served.add(canonical_model(model))
        # The healthcheck pings the node name the worker gives itself.
        node = re.search(r'-d "([^"@]+)@', worker["healthcheck"]["test"][1])
        assert node and node.group(1) == default_node_name((canonical_model(model),)).split("@")[0]
    assert served == {canonical_model(m) for m in pulled}


def resolve(group: click.Group, argv: list[str]) -> None:
    """Parse ``argv`` through nested click groups as the CLI would, without running anything."""
    ctx = group.make_context(group.name or "cli", list(argv), resilient_parsing=False)
    command: click.Command = group
    while isinstance(command, click.Group):
        with warnings.catch_warnings():  # click 8.2 moves these into ctx.args
            warnings.simplefilter("ignore", DeprecationWarning)
            rest = [*getattr(ctx, "protected_args", []), *ctx.args]
        if not rest:
            break
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None, f"no command {name!r}"
        ctx = sub.make_context(name or "", rest, parent=ctx)
        command = sub


def check_command(argv: list[str]) -> None:
    """``argv`` runs in the project image: a console script with valid arguments."""
    assert argv[0] in IMAGE_SCRIPTS, argv
    if argv[0] == "corral":
        scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
        assert scripts["corral"] == "producers.cli:main"
        from producers.cli import cli

        with click.Context(cli) as ctx:
            registered = cli.list_commands(ctx)
        assert argv[1] in registered, f"`corral {argv[1]}` is not registered in producers.cli"
        resolve(cli, argv[1:])
    elif argv[0] == "celery":
        from celery.bin.celery import celery

        resolve(celery, argv[1:])
        app_module = argv[argv.index("-A") + 1]
        assert __import__(app_module, fromlist=["app"]).app.main == "corral"
    else:
        assert argv[1] == "-c"
        compile(argv[2], "<healthcheck>", "exec")


def test_every_project_command_exists_in_the_image(services: dict[str, dict[str, Any]]) -> None:
    for name, service in project_services(services).items():
        check_command(service["command"])
        test = service["healthcheck"]["test"]
        if test[0] == "CMD":
            check_command(test[1:])
        else:
            assert test[0] == "CMD-SHELL", name
            check_command(shlex.split(test[1].replace("$HOSTNAME", "host")))


def test_environment_names_are_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed = {f"CORRAL_{f.upper()}" for f in Settings.model_fields} | {"OLLAMA_HOST"}
    flower_names = set(flower_options.as_dict())
    for name, service in project_services(services).items():
        env = service["environment"]
        for key in env:
            if key.startswith("FLOWER_"):
                assert name == "flower" and key[7:].lower() in flower_names, key
            else:
                assert key in allowed, f"{name}: {key} is not a setting"
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        settings = load_settings()  # refuses unknown CORRAL_* names
        assert settings.redis_url.endswith("@redis:6379/0")
        assert settings.ollama_host == "http://ollama:11434"
        for key in env:
            monkeypatch.delenv(key)


def test_mounted_files_exist_and_query_exported_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
    exported = exported_metric_names()
    prometheus = yaml.safe_load((ROOT / "monitoring/prometheus/prometheus.yml").read_text())
    targets = {
        t
        for job in prometheus["scrape_configs"]
        for s in job["static_configs"]
        for t in s["targets"]
    }
    assert targets == {"exporter:9808", "flower:5555"}
    alerts = yaml.safe_load((ROOT / "monitoring/prometheus/alerts.yml").read_text())
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    keda = yaml.safe_load((ROOT / "monitoring/keda/scaledobject.yaml").read_text())
    exprs += [t["metadata"]["query"] for t in keda["spec"]["triggers"]]
    dashboard = json.loads((ROOT / "monitoring/grafana/dashboards/corral.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for expr in exprs:
        assert metrics_in(expr) and metrics_in(expr) <= exported, expr
    datasource = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {datasource["uid"]}
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("queue depth", "throughput", "p95", "tokens", "errors"):
        assert topic in titles, topic


def test_dockerfile_is_multi_stage_slim_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all("slim" in s for s in stages)
    final = text[text.rindex("\nFROM ") :]
    user = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert "COPY --from=build" in final and "COPY . ." not in final
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


@pytest.mark.skipif(not shutil.which("docker"), reason="the docker CLI is not installed")
def test_docker_compose_config_validates() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker compose plugin is not installed (docker CLI only)")
    env = {**ENV, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
