"""Settings as a user meets them: bad values, Redis URL forms, ``corral config``, README's table.

No Redis is needed: a bad setting is refused before anything connects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from producers.cli.settings_table import README_BEGIN, README_END, markdown_table
from tasks.errors import InvalidRequest, InvalidSetting
from tasks.redis_url import masked, normalise_redis_url
from tasks.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
# Not on loopback (TEST-NET-1): an entry point that got past the settings starts no Redis.
UNUSED_URL = "redis://192.0.2.1:6379/0"


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An embedded Redis started by mistake would land here, not in the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path))


def corral(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producers.cli", *args],
        env={**os.environ, "CORRAL_REDIS_URL": UNUSED_URL, **(env or {})},
        text=True,
        capture_output=True,
        timeout=timeout_s,
    )


# -- a bad value: one line, exit status 2, from every entry point ---------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["queues"],
        ["submit", "generate", "llama3.2", "hi"],
        ["worker", "--model", "llama3.2"],
        ["worker", "--model", "llama3.2", "--no-supervise"],
        ["gateway", "--port", "9"],
        ["keys", "list"],
        ["status"],
        ["flower", "--basic-auth=a:b"],
        ["exporter"],
        ["config"],
    ],
    ids=lambda args: " ".join(args[:2]),
)
def test_a_bad_setting_value_is_one_line_and_exit_2(args: list[str]) -> None:
    run = corral(*args, env={"CORRAL_STALL_TIMEOUT_S": "abc"})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "CORRAL_STALL_TIMEOUT_S='abc'" in lines[0] and "valid number" in lines[0]


def test_an_http_redis_url_is_a_bad_setting_not_a_transient_failure() -> None:
    run = corral("queues", env={"CORRAL_REDIS_URL": "http://:S3cretPW@redis.example:6379/0"})
    assert run.returncode == 2
    assert "CORRAL_REDIS_URL" in run.stderr and "rediss://" in run.stderr
    assert "transient" not in run.stderr and "S3cretPW" not in run.stderr


def test_setting_errors_name_the_variable_or_the_keyword() -> None:
    with pytest.raises(InvalidSetting) as raised:
        load_settings(task_attempts=0)
    assert raised.value.field == "task_attempts"
    assert "task_attempts=0 is not valid" in str(raised.value)
    assert isinstance(raised.value, InvalidRequest)  # callers catching bad input still catch it


def test_celery_variables_are_a_setting_error(redis_url: str) -> None:
    run = corral(
        "queues", env={"CELERY_BROKER_URL": "redis://elsewhere/0", "CORRAL_REDIS_URL": redis_url}
    )
    assert run.returncode == 2 and "unset it" in run.stderr
    assert "submit again" not in run.stderr  # there is nothing to submit


# -- Redis URL forms -------------------------------------------------------------------------
def test_rediss_urls_are_written_in_the_one_form_every_client_reads(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    base = "rediss://:pw@redis.example:6380/0"
    # no ssl_cert_reqs: verified, as redis-py does (kombu alone would silently not verify)
    assert normalise_redis_url(base).endswith("?ssl_cert_reqs=required")
    # Celery's documented CERT_* names and redis-py's own names mean the same
    spellings = [
        ("CERT_REQUIRED", "required"),
        ("CERT_OPTIONAL", "optional"),
        ("CERT_NONE", "none"),
        ("required", "required"),
        ("none", "none"),
    ]
    for given, meant in spellings:
        assert f"ssl_cert_reqs={meant}" in normalise_redis_url(f"{base}?ssl_cert_reqs={given}")
    url = normalise_redis_url(f"{base}?ssl_ca_certs={ca}&ssl_check_hostname=no")
    assert f"ssl_ca_certs={ca}" in url and "ssl_check_hostname=false" in url
    assert normalise_redis_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://redis.example:6379/0", "not a Redis URL"),
        ("unix:///run/redis.sock", "not a Redis URL"),
        ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "need a rediss:// URL"),
        ("rediss://h:6380/0?ssl_cert_reqs=CERT_MAYBE", "expected required, optional or none"),
        ("rediss://h:6380/0?ssl_ca_certs=/no/such/ca.pem", "no such file"),
        ("rediss://h:6380/0?ssl_check_hostname=perhaps", "expected true or false"),
    ],
)
def test_bad_redis_urls_say_what_is_expected(url: str, says: str) -> None:
    with pytest.raises(InvalidSetting, match=says) as raised:
        load_settings(redis_url=url)
    assert raised.value.field == "redis_url"


def test_masked_hides_the_password_and_keeps_the_rest() -> None:
    url = "rediss://ops:S3cretPW@redis.example:6380/0?ssl_cert_reqs=required"
    assert masked(url) == "rediss://ops:**@redis.example:6380/0?ssl_cert_reqs=required"
    assert masked("redis://:S3cretPW@h/0") == "redis://:**@h/0"
    assert "S3cretPW" not in masked("redis://h/0?password=S3cretPW")
    assert masked("redis://h:6379/0") == "redis://h:6379/0"


# -- corral config and README ----------------------------------------------------------------
def test_config_shows_the_values_in_effect_with_the_password_masked() -> None:
    env = {
        "CORRAL_VISIBILITY_TIMEOUT_S": "45",
        "CORRAL_REDIS_URL": "redis://:S3cretPW@h:1/0",
        "CORRAL_GATEWAY_RATE_PER_MINUTE": "7",
    }
    run = corral("config", "--json", env=env)
    assert run.returncode == 0, run.stderr
    rows = {r["env"]: r for r in json.loads(run.stdout)}
    assert rows["CORRAL_VISIBILITY_TIMEOUT_S"]["value"] == 45
    assert rows["CORRAL_VISIBILITY_TIMEOUT_S"]["default"] == 20
    assert rows["CORRAL_GATEWAY_RATE_PER_MINUTE"]["value"] == 7
    assert rows["CORRAL_REDIS_URL"]["value"] == "redis://:**@h:1/0"
    table = corral("config", env=env).stdout
    assert "VALUE" in table and "S3cretPW" not in table


def test_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert README_BEGIN in readme and README_END in readme, "README lost its table markers"
    table = readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n") + "\n"
    assert table == markdown_table(), "run `corral config --markdown` and paste it into README"
    for name in (
        "CORRAL_VISIBILITY_TIMEOUT_S",
        "CORRAL_LEASE_TTL_S",
        "CORRAL_IDEMPOTENCY_TTL_S",
        "CORRAL_MAX_QUEUE_DEPTH",
        "CORRAL_MODEL_GRACE_S",
    ):
        assert f"`{name}`" in table
    assert "| `CORRAL_VISIBILITY_TIMEOUT_S` | 20 |" in table
    assert corral("config", "--markdown").stdout == markdown_table()


def test_sim_help_lists_the_simulator_options() -> None:
    run = corral("sim", "--help")
    assert run.returncode == 0
    assert "--port" in run.stdout and "--num-parallel" in run.stdout


def test_next_steps_name_the_field_or_say_what_to_fix() -> None:
    from producers.cli.render import describe_error

    assert "named field" not in describe_error(InvalidRequest("the body is not JSON"))
    hint = describe_error(InvalidRequest("unknown option", field="options.seed"))
    assert "next: fix options.seed and submit again" in hint
    one = describe_error(InvalidSetting("CORRAL_X='y' is not valid: …; fix or unset it"))
    assert "\n" not in one  # the message already says what to do
