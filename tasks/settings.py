"""Every setting of ollama-corral, read once from the environment.

Each field is documented with its unit and default; README's configuration table is generated
from this class (``corral config``). ``CORRAL_*`` variables that name no setting are refused, so
a typo never passes silently.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import InvalidSetting
from tasks.redis_url import masked, normalise_redis_url

ENV_PREFIX = "CORRAL_"
# Parts with settings of their own check these names themselves (the gateway: GatewayConfig).
DELEGATED_PREFIXES = ("CORRAL_GATEWAY_",)


class Settings(BaseSettings):
    """ollama-corral configuration (environment variables ``CORRAL_*`` and ``OLLAMA_HOST``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Broker, result backend and streams: redis://[[user]:password@]host:port/db, "
        "or rediss:// for TLS (README, 'Redis: passwords and TLS'). A loopback redis:// URL "
        "where nothing listens makes the CLI start an embedded redis-server there, with the "
        "URL's password.",
    )
    ollama_host: str = Field(
        "http://127.0.0.1:11434",
        validation_alias=AliasChoices("OLLAMA_HOST", "CORRAL_OLLAMA_HOST"),
        description="The Ollama server a worker calls (same forms as Ollama's own clients: "
        "host, host:port, http(s)://host:port).",
    )
    # HTTP to Ollama
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect timeout to Ollama.")
    first_byte_timeout_s: float = Field(
        300.0, gt=0, description="Wait for the first streamed chunk (queue + load + prompt eval)."
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence allowed between two streamed chunks."
    )
    task_deadline_s: float = Field(
        1800.0, gt=0, description="Per-task deadline covering queue wait and run time."
    )
    http_retries: int = Field(
        4, ge=0, description="Transport retries (connection errors, 502/503/504) per request."
    )
    task_attempts: int = Field(
        3, ge=1, description="Attempts per task for retryable failures (runner crash, cut stream)."
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="First retry backoff; doubles each time.")
    retry_backoff_max_s: float = Field(10.0, ge=0, description="Cap on one retry backoff.")
    tls_verify: bool = Field(True, description="Verify the certificate of https Ollama hosts.")
    tls_ca_bundle: Path | None = Field(None, description="CA bundle for https Ollama hosts.")
    tls_client_cert: Path | None = Field(None, description="Client certificate (PEM) for mTLS.")
    tls_client_key: Path | None = Field(None, description="Client key (PEM) for mTLS.")
    # Redis records
    result_ttl_s: int = Field(86400, gt=0, description="How long results and task records live.")
    stream_ttl_s: int = Field(3600, gt=0, description="How long a task's replay log lives.")
    stream_maxlen: int = Field(20000, gt=10, description="Events kept in a task's replay log.")
    blob_ttl_s: int = Field(3600, gt=0, description="How long images sent by reference live.")
    visibility_timeout_s: int = Field(
        20,
        gt=0,
        description="A message whose worker stopped renewing it is redelivered after this long "
        "(the bound on crash recovery; running tasks renew it, so they never run twice).",
    )
    lease_ttl_s: float = Field(
        10.0, gt=0, description="A running task's lease lapses this long after its worker died."
    )
    idempotency_ttl_s: int = Field(
        86400, gt=0, description="How long an idempotency key maps to its first task."
    )
    # Input limits
    max_prompt_chars: int = Field(200_000, gt=0, description="Longest prompt or message text.")
    max_messages: int = Field(500, gt=0, description="Most messages in one chat.")
    max_images: int = Field(8, ge=0, description="Most images in one task.")
    max_image_bytes: int = Field(20 * 2**20, gt=0, description="Largest image, in bytes.")
    inline_image_max_bytes: int = Field(
        64 * 2**10, ge=0, description="Images larger than this travel by reference (in Redis)."
    )
    max_image_pixels: int = Field(
        50_000_000,
        gt=0,
        description="Most pixels in one image, read from its header before any decoding (a "
        "48-megapixel camera photo fits; 150 MB once decoded to RGB).",
    )
    max_schema_bytes: int = Field(64 * 2**10, gt=0, description="Largest JSON Schema, as JSON.")
    max_schema_depth: int = Field(16, gt=0, description="Deepest nesting of a JSON Schema.")
    max_json_depth: int = Field(
        64, gt=0, le=500, description="Deepest nesting (objects and arrays) of a request."
    )
    # Ollama options with no bound of their own
    max_num_ctx: int = Field(
        262_144,
        gt=0,
        description="Largest options.num_ctx (and num_batch, num_keep, repeat_last_n), in "
        "tokens; the largest context Ollama picks by itself.",
    )
    max_num_predict: int = Field(
        131_072, gt=0, description="Largest options.num_predict, in tokens."
    )
    max_num_thread: int = Field(
        1024, gt=0, description="Largest options.num_thread (CPU threads on one Ollama host)."
    )
    # Embeddings (docs/decisions.md, "Embed tasks are gathered into batches")
    max_embed_inputs: int = Field(10_000, gt=0, description="Most inputs in one embed task.")
    embed_batch_max_inputs: int = Field(
        256,
        gt=0,
        description="Most inputs in one /api/embed call: a worker gathers the waiting embed "
        "tasks of a model into calls of up to this many inputs, and splits a larger task.",
    )
    # Batches (docs/batches.md)
    batch_dir: Path = Field(
        Path("~/.local/share/corral/batches"),
        description="Where batches keep spooled inputs and large output files; the processes "
        "that follow a batch must share it.",
    )
    batch_redis_max_lines: int = Field(
        1000, ge=0, description="Batches of at most this many lines keep their output in Redis."
    )
    batch_completion_window_s: float = Field(
        86400.0, gt=0, description="Default time a batch has to finish before it expires."
    )
    batch_ttl_s: int = Field(
        7 * 86400, gt=0, description="How long a finished batch's record and output live."
    )
    batch_file_max_bytes: int = Field(
        200 * 1024 * 1024,
        gt=0,
        description="Largest file the gateway's POST /v1/files takes (OpenAI's batch limit).",
    )
    # Scheduling (docs/scheduling.md)
    max_queue_depth: int = Field(
        10_000,
        gt=0,
        description="Tasks a model may hold waiting or released but not started; past it, "
        "submissions get QueueFull. `corral:sched:bounds` in Redis overrides it per model.",
    )
    priority_aging_s: float = Field(
        60.0, gt=0, description="A waiting task gains one priority step per this many seconds."
    )
    max_model_wait_s: float = Field(
        30.0,
        gt=0,
        description="An Ollama host leaves its loaded model for another once that model's "
        "oldest task has waited this many seconds.",
    )
    max_loaded_models: int = Field(
        0,
        ge=0,
        description="Models the worker's Ollama host keeps loaded at once (its "
        "OLLAMA_MAX_LOADED_MODELS, or what fits its memory); 0: learn it from the host's "
        "/api/ps, starting from 1. Give every worker of one host the same value.",
    )
    model_grace_s: float = Field(
        300.0,
        ge=0,
        description="A model a worker served, or an Ollama host listed, within this many "
        "seconds still counts as served: a rolling restart of workers does not refuse work.",
    )

    # Webhooks (README, "Webhooks")
    webhook_secret: SecretStr | None = Field(
        None,
        description="Signs webhook deliveries (Standard Webhooks): whsec_ and base64, shared "
        "with the receivers. Needed by every process that submits with a callback URL and by "
        "the workers that deliver.",
    )
    webhook_attempts: int = Field(
        18,
        ge=1,
        description="Delivery attempts before a webhook goes to the dead letters (`corral "
        "webhooks list`); with the backoff below, about a day of retries.",
    )
    webhook_backoff_s: float = Field(
        10.0, gt=0, description="Wait before a webhook's second attempt; doubles each time."
    )
    webhook_backoff_max_s: float = Field(
        10800.0, gt=0, description="Cap on the wait between two webhook attempts."
    )
    webhook_timeout_s: float = Field(
        5.0, gt=0, description="Connect and read timeout of one webhook delivery."
    )
    webhook_senders: int = Field(
        4, ge=1, le=64, description="Webhooks one worker process sends at once."
    )
    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated callback hosts allowed although they resolve to a "
        "loopback, private or otherwise non-public address (e.g. 'hooks.internal,127.0.0.1').",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # set but empty (e.g. from a compose file): no secret
        check_webhook_secret(value.get_secret_value())
        return value

    @property
    def webhook_hosts(self) -> frozenset[str]:
        """:attr:`webhook_allowed_hosts` as a set of lower-cased host names."""
        items = self.webhook_allowed_hosts.split(",")
        return frozenset(h.strip().lower().strip("[]") for h in items if h.strip())

    @field_validator("redis_url")
    @classmethod
    def _one_url_form(cls, value: str) -> str:
        return normalise_redis_url(value)


def check_webhook_secret(secret: str) -> None:
    """A Standard Webhooks secret: ``whsec_`` then base64 of at least 24 bytes."""
    body = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except ValueError as exc:
        raise ValueError(
            "expected whsec_ followed by base64 (e.g. whsec_$(openssl rand -base64 32))"
        ) from exc
    if not secret.startswith("whsec_") or len(key) < 24:
        raise ValueError(
            "expected whsec_ followed by the base64 of 24 to 64 random bytes "
            "(e.g. whsec_$(openssl rand -base64 32))"
        )


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment (overrides win), refusing unknown CORRAL_* names."""
    refuse_unknown_env(Settings, ENV_PREFIX, delegated=DELEGATED_PREFIXES)
    return build_settings(Settings, overrides)


def refuse_unknown_env(
    settings_class: type[BaseSettings], prefix: str, *, delegated: tuple[str, ...] = ()
) -> None:
    """Refuse environment variables under ``prefix`` that name no field of ``settings_class``
    (except those under a ``delegated`` prefix, which another class checks)."""
    known = {prefix + name.upper() for name in settings_class.model_fields}
    unknown = sorted(
        k
        for k in os.environ
        if k.startswith(prefix) and k not in known and not k.startswith(delegated)
    )
    if unknown:
        raise InvalidSetting(
            f"unknown setting {', '.join(unknown)}; run `corral config` to list the settings",
            field=unknown[0],
        )


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def build_settings(cls: type[SettingsT], overrides: dict[str, Any]) -> SettingsT:
    """``cls`` read from the environment, ``overrides`` winning. A bad value raises
    :class:`InvalidSetting`: one line naming the variable, its value and what is expected."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return cls(**clean)
    except ValidationError as exc:
        problems = [_problem(cls, error, clean) for error in exc.errors()]
        names = [name for name, _ in problems]
        hint = "fix or unset it" if len(names) == 1 else "fix or unset them"
        raise InvalidSetting(
            f"{'; '.join(text for _, text in problems)}; {hint} (`corral config` lists every "
            "setting with its default)",
            field=names[0],
        ) from exc


def env_name(cls: type[BaseSettings], name: str) -> str:
    """The environment variable of setting ``name`` (``OLLAMA_HOST`` keeps Ollama's name)."""
    alias = cls.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices) and isinstance(alias.choices[0], str):
        return alias.choices[0]
    return str(cls.model_config.get("env_prefix", "")) + name.upper()


def _problem(cls: type[BaseSettings], error: Any, overrides: dict[str, Any]) -> tuple[str, str]:
    loc = str(error["loc"][0]) if error["loc"] else "?"
    name = next((n for n in cls.model_fields if loc in (n, env_name(cls, n))), loc)
    if name in overrides:
        label = f"{name}="  # given in code, not by the environment
    elif name in cls.model_fields:
        label = f"{env_name(cls, name)}="
    else:
        label = f"unknown setting {name}="
    message = str(error["msg"]).removeprefix("Value error, ")
    value = error.get("input")
    value = masked(value) if isinstance(value, str) else value
    return label.rstrip("="), f"{label}{value!r} is not valid: {message[:1].lower()}{message[1:]}"
