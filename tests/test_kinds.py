"""The task kinds' registry: every part that exists per kind is derived from it.

A kind is registered once (``tasks/kinds/``), and then has its Celery task, its SDK method, its
``corral submit`` subcommand, its ``/v1/tasks/<kind>`` route and its payload's schema in the
gateway's OpenAPI document. ``echo_kind.py`` is a kind the project does not know; registering it
must be enough for all of these, in process and in a real worker.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import echo_kind
import pytest
import requests
from celery import Celery
from click.testing import CliRunner
from test_gateway_support import GatewayServer

import tasks.kinds
from monitoring.events import kind_of_task
from producers import Client
from producers.cli.main import cli
from producers.gateway import GatewayConfig, create_app
from producers.jobs import Job
from tasks.definitions import CorralTask, register_tasks
from tasks.errors import InvalidRequest
from tasks.kinds import KindMethods, registry
from tasks.kinds.base import SubmitOptions, TaskKind
from tasks.payloads import validate_payload
from tasks.results import parse_result
from tasks.settings import Settings
from workers.processes import Child

TESTS = Path(__file__).parent
ECHO_MODEL = "echo-model"
WAIT_S = 30


@pytest.fixture
def echo_registered() -> Iterator[TaskKind]:
    registry.register(echo_kind.KIND)
    yield echo_kind.KIND
    registry.unregister(echo_kind.NAME)


def assert_derived_everywhere(kind: TaskKind) -> None:
    """The kind's Celery task, SDK method, CLI subcommand, route and schema, each built fresh."""
    celery_app = Celery("kinds-test", set_as_current=False)
    assert kind.name in register_tasks(celery_app)
    task = celery_app.tasks[kind.task_name]
    assert isinstance(task, CorralTask) and task.name == f"corral.{kind.name}"

    assert getattr(Client, kind.name) is kind.sdk
    # Every method takes the submission keywords (the scheduler's order among them) as
    # Client.submit does, with its defaults.
    takes = inspect.signature(kind.sdk).parameters.values()
    shared = [param.annotation for param in takes if param.kind is param.VAR_KEYWORD]
    assert shared == ["Unpack[SubmitOptions]"]
    submit = inspect.signature(Client.submit).parameters
    assert SubmitOptions.__optional_keys__ <= submit.keys()
    assert submit["priority"].default == 5 and submit["tenant"].default is None

    listing = CliRunner().invoke(cli, ["submit", "--help"])
    assert listing.exit_code == 0 and f"  {kind.name}  " in listing.output
    command = CliRunner().invoke(cli, ["submit", kind.name, "--help"])
    assert command.exit_code == 0, command.output
    assert kind.cli.help in " ".join(command.output.split())
    assert "--wait" in command.output and "--idempotency-key" in command.output
    assert "--priority" in command.output and "--tenant" in command.output

    document = create_app(Settings(), GatewayConfig()).openapi()
    route = document["paths"][f"/v1/tasks/{kind.name}"]["post"]
    body = route["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": f"#/components/schemas/{kind.payload.__name__}"}
    assert document["components"]["schemas"][kind.payload.__name__]["properties"]["model"]

    assert registry.get(kind.name) is kind
    assert kind_of_task(kind.task_name, "unknown") == kind.name


@pytest.mark.parametrize("name", tasks.kinds.KINDS)
def test_every_registered_kind_has_all_its_parts(name: str) -> None:
    assert_derived_everywhere(registry.get(name))


def test_a_new_kind_appears_everywhere_once_registered(echo_registered: TaskKind) -> None:
    assert_derived_everywhere(echo_registered)
    payload = validate_payload("echo", {"model": "Echo-Model", "text": "hi"})
    assert isinstance(payload, echo_kind.EchoPayload) and payload.model == "echo-model:latest"
    parsed = parse_result({"task_id": "t", "kind": "echo", "model": "m", "text": "hi"})
    assert isinstance(parsed, echo_kind.EchoResult)


def test_an_unregistered_kind_is_gone_again() -> None:
    registry.register(echo_kind.KIND)
    registry.unregister("echo")
    assert "echo" not in registry and not hasattr(Client, "echo")
    with pytest.raises(InvalidRequest, match="unknown task kind 'echo'"):
        validate_payload("echo", {"model": "m", "text": "hi"})


@pytest.fixture(scope="module")
def echo_worker(
    redis_url: str, sim_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Child]:
    """A real worker of ``echo-model`` that knows the echo kind (``echo_kind.py`` as a script)."""
    from producers.cli.local_stack import wait_for_worker

    log = tmp_path_factory.mktemp("echo") / "worker.log"
    node = f"echo.{os.getpid()}@localhost"
    argv = [
        sys.executable,
        str(TESTS / "echo_kind.py"),
        "worker",
        "--no-supervise",
        "--model",
        ECHO_MODEL,
        "--name",
        node,
        "--loglevel",
        "WARNING",
    ]
    env = {**os.environ, "CORRAL_REDIS_URL": redis_url, "OLLAMA_HOST": sim_url}
    with open(log, "w") as out:
        process = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    child = Child(process, log)
    try:
        wait_for_worker(redis_url, node, child, WAIT_S)
        yield child
    finally:
        child.stop()


def test_a_new_kind_runs_through_sdk_cli_and_gateway(
    echo_registered: TaskKind,
    echo_worker: Child,
    client: Client,
    redis_url: str,
    settings: Settings,
) -> None:
    job: Job = client.echo(ECHO_MODEL, "hello")
    result = job.result(timeout=WAIT_S)
    assert isinstance(result, echo_kind.EchoResult)
    assert result.text == "hello" and result.worker and result.timings.finished_at
    assert [e["type"] for e in job.stream()] == ["start", "token", "done"]

    env = {**os.environ, "CORRAL_REDIS_URL": redis_url}
    run = subprocess.run(
        [
            sys.executable,
            str(TESTS / "echo_kind.py"),
            "submit",
            "echo",
            ECHO_MODEL,
            "from the CLI",
            "--wait",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"] == "from the CLI"

    with GatewayServer(settings) as server:
        reply = requests.post(
            f"{server.url}/v1/tasks/echo",
            timeout=WAIT_S,
            json={"model": ECHO_MODEL, "text": "over HTTP"},
        )
        assert reply.status_code == 202, reply.text
        outcome = client.job(reply.json()["id"]).result(timeout=WAIT_S)
    assert isinstance(outcome, echo_kind.EchoResult) and outcome.text == "over HTTP"


def test_kind_methods_spell_out_every_kind_of_the_registry() -> None:
    """Type checkers see the SDK's methods only where ``KindMethods`` spells them out."""
    source = Path(tasks.kinds.__file__).read_text()
    spelled = {
        target.id
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ClassDef) and node.name == "KindMethods"
        for statement in node.body
        if isinstance(statement, ast.Assign)
        for target in statement.targets
        if isinstance(target, ast.Name)
    }
    assert spelled == set(tasks.kinds.KINDS)
    for name in spelled:
        assert KindMethods.__dict__[name] is registry.get(name).sdk


def test_the_registry_refuses_what_would_not_derive() -> None:
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.get("generate"))
    with pytest.raises(ValueError, match="must match"):
        dataclasses.replace(echo_kind.KIND, name="Echo Kind")
    with pytest.raises(ValueError, match="EchoResult.kind must default to 'shout'"):
        dataclasses.replace(echo_kind.KIND, name="shout")
    with pytest.raises(InvalidRequest, match="expected one of generate, chat, structured"):
        registry.get("embedz")


def test_the_sdk_loads_no_worker_parts() -> None:
    code = (
        "import sys, producers; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('requests', 'workers')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert run.stdout.strip() == "[]"
