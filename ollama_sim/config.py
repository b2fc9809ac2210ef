"""The model catalogue and server settings, from defaults, a JSON file, env vars and flags.

Every duration is in seconds; sizes are in bytes. A JSON config file looks like::

    {"num_parallel": 2, "max_queue": 512, "max_loaded_models": 3, "keep_alive": "5m",
     "speed": 1.0, "seed": 0, "no_delay": false,
     "models": [{"name": "llama3.2", "capabilities": ["completion", "tools"],
                 "size_bytes": 2019393189, "load_s": 0.8, "tokens_per_s": 60,
                 "first_token_s": 0.08, "family": "llama", "parameter_size": "3.2B",
                 "quantization": "Q4_K_M"}],
     "faults": {"error_rate": {"500": 0.01}}}

``models`` replaces the default catalogue. Unknown keys are rejected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .golike import FOREVER_S, GoError, parse_keep_alive, parse_model_name

CAPABILITIES = ("completion", "vision", "tools", "thinking", "embedding", "insert")
OLLAMA_VERSION = "0.12.10"
DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_NUM_CTX = 4096
VISION_MIN_NUM_CTX = 2048


class ConfigError(ValueError):
    """The configuration (file, flags or admin request) is invalid."""


@dataclass(frozen=True)
class ModelSpec:
    """One installed model and how fast it behaves."""

    name: str
    capabilities: tuple[str, ...] = ("completion",)
    size_bytes: int = 2_000_000_000
    load_s: float = 1.0
    tokens_per_s: float = 50.0
    """Generation speed; 0 means unlimited."""
    first_token_s: float = 0.1
    """Prompt evaluation time before the first token (or the whole embed computation)."""
    embedding_dim: int = 0
    family: str = "llama"
    families: tuple[str, ...] = ()
    parameter_size: str = "7B"
    quantization: str = "Q4_K_M"
    context_length: int = 131_072
    """Training context length, shown by /api/show."""
    modified_unix_s: float = 1_735_689_600.0

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def full_name(self) -> str:
        parsed = parse_model_name(self.name)
        return parsed.full if parsed else self.name

    def has(self, capability: str) -> bool:
        return capability in self.capabilities


def default_models() -> list[ModelSpec]:
    """The catalogue installed when no config file names its own models."""
    return [
        ModelSpec(
            "llama3.2:latest",
            ("completion", "tools"),
            2_019_393_189,
            0.8,
            60.0,
            0.08,
            family="llama",
            parameter_size="3.2B",
            quantization="Q4_K_M",
            modified_unix_s=1_735_689_600.0,
        ),
        ModelSpec(
            "llava:7b",
            ("completion", "vision"),
            4_733_363_377,
            1.2,
            45.0,
            0.15,
            family="llama",
            families=("llama", "clip"),
            parameter_size="7B",
            quantization="Q4_0",
            context_length=32_768,
            modified_unix_s=1_733_011_200.0,
        ),
        ModelSpec(
            "deepseek-r1:14b",
            ("completion", "thinking"),
            8_988_112_040,
            1.5,
            40.0,
            0.12,
            family="qwen2",
            parameter_size="14.8B",
            quantization="Q4_K_M",
            modified_unix_s=1_737_504_000.0,
        ),
        ModelSpec(
            "qwen2.5-coder:7b",
            ("completion", "tools", "insert"),
            4_683_087_332,
            1.0,
            50.0,
            0.1,
            family="qwen2",
            parameter_size="7.6B",
            quantization="Q4_K_M",
            context_length=32_768,
            modified_unix_s=1_731_628_800.0,
        ),
        ModelSpec(
            "all-minilm:latest",
            ("embedding",),
            45_960_996,
            0.3,
            0.0,
            0.02,
            embedding_dim=384,
            family="bert",
            parameter_size="23M",
            quantization="F16",
            context_length=512,
            modified_unix_s=1_722_470_400.0,
        ),
        ModelSpec(
            "nomic-embed-text:latest",
            ("embedding",),
            274_302_450,
            0.4,
            0.0,
            0.03,
            embedding_dim=768,
            family="nomic-bert",
            parameter_size="137M",
            quantization="F16",
            context_length=2048,
            modified_unix_s=1_722_470_400.0,
        ),
    ]


@dataclass
class SimConfig:
    """Server-wide settings. Mutable: ``PUT /_sim/config`` changes some of them at run time."""

    models: list[ModelSpec] = field(default_factory=default_models)
    num_parallel: int = 1
    max_queue: int = 512
    max_loaded_models: int = 3
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S
    """Default idle time before unload; ``FOREVER_S`` (inf) never unloads."""
    no_delay: bool = False
    """Zero every load, first-token and per-token delay (tests and benchmarks)."""
    speed: float = 1.0
    """Multiplier on every simulated delay (2.0 = twice as slow)."""
    seed: int = 0
    default_num_ctx: int = DEFAULT_NUM_CTX
    event_buffer: int = 10_000
    max_reply_tokens: int = 131_072
    """Longest reply generated, in tokens, whatever num_predict and num_ctx allow (Ollama's own
    bound is ten context windows); it caps what one request can make the simulator build."""
    max_embed_inputs: int = 10_000
    """Most inputs one /api/embed request may send (400 beyond): Ollama has no such limit."""
    faults: dict[str, Any] = field(default_factory=dict)
    """Initial fault configuration, in the ``/_sim/faults`` JSON shape."""

    def delay(self, seconds: float) -> float:
        """The real time to spend for a simulated delay of ``seconds``."""
        return 0.0 if self.no_delay else max(0.0, seconds * self.speed)

    def find_model(self, name: str) -> ModelSpec | None:
        """Look up a model by any spelling of its name (tag defaults to ``latest``)."""
        parsed = parse_model_name(name)
        if parsed is None:
            return None
        for spec in self.models:
            if spec.name == parsed.short:
                return spec
        return None


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}
_TOP_FIELDS = {
    "models",
    "num_parallel",
    "max_queue",
    "max_loaded_models",
    "keep_alive",
    "no_delay",
    "speed",
    "seed",
    "default_num_ctx",
    "event_buffer",
    "max_reply_tokens",
    "max_embed_inputs",
    "faults",
}


def model_from_json(data: Mapping[str, Any]) -> ModelSpec:
    """Build a ModelSpec from its JSON form, canonicalising the name."""
    unknown = set(data) - _MODEL_FIELDS
    if unknown:
        raise ConfigError(f"unknown model fields: {sorted(unknown)}")
    if "name" not in data:
        raise ConfigError("every model needs a name")
    parsed = parse_model_name(str(data["name"]))
    if parsed is None:
        raise ConfigError(f"invalid model name: {data['name']!r}")
    values = dict(data, name=parsed.short)
    for key in ("capabilities", "families"):
        if key in values:
            values[key] = tuple(values[key])
    bad = set(values.get("capabilities", ())) - set(CAPABILITIES)
    if bad:
        raise ConfigError(f"unknown capabilities: {sorted(bad)}")
    if "embedding" in values.get("capabilities", ()) and not values.get("embedding_dim"):
        values["embedding_dim"] = 384
    try:
        return ModelSpec(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def keep_alive_from_json(value: Any) -> float:
    """Parse a keep_alive setting (seconds or Go duration string)."""
    try:
        seconds = parse_keep_alive(value)
    except GoError as exc:
        raise ConfigError(f"keep_alive: {exc}") from exc
    return DEFAULT_KEEP_ALIVE_S if seconds is None else seconds


def apply_json(config: SimConfig, data: Mapping[str, Any]) -> SimConfig:
    """Apply a JSON config document onto ``config`` (in place) and return it."""
    unknown = set(data) - _TOP_FIELDS
    if unknown:
        raise ConfigError(f"unknown config fields: {sorted(unknown)}")
    for key, value in data.items():
        if key == "models":
            config.models = [model_from_json(item) for item in value]
        elif key == "keep_alive":
            config.keep_alive_s = keep_alive_from_json(value)
        elif key == "faults":
            config.faults = dict(value)
        elif key in ("no_delay",):
            config.no_delay = bool(value)
        elif key == "speed":
            config.speed = float(value)
        else:
            setattr(config, key, int(value))
    validate(config)
    return config


def load_file(config: SimConfig, path: str | Path) -> SimConfig:
    """Apply a JSON config file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("the config file must hold a JSON object")
    return apply_json(config, data)


def apply_env(config: SimConfig, environ: Mapping[str, str] | None = None) -> SimConfig:
    """Read the OLLAMA_* variables the real server reads, as defaults under the flags."""
    env = os.environ if environ is None else environ
    for var, attr in (
        ("OLLAMA_NUM_PARALLEL", "num_parallel"),
        ("OLLAMA_MAX_QUEUE", "max_queue"),
        ("OLLAMA_MAX_LOADED_MODELS", "max_loaded_models"),
    ):
        if env.get(var):
            try:
                value = int(env[var])
            except ValueError as exc:
                raise ConfigError(f"{var} must be an integer") from exc
            if value > 0:
                setattr(config, attr, value)
    if env.get("OLLAMA_KEEP_ALIVE"):
        raw = env["OLLAMA_KEEP_ALIVE"]
        config.keep_alive_s = keep_alive_from_json(int(raw) if raw.lstrip("-").isdigit() else raw)
    return config


def validate(config: SimConfig) -> None:
    """Reject settings the server cannot run with."""
    if config.num_parallel < 1 or config.max_queue < 0 or config.max_loaded_models < 1:
        raise ConfigError("num_parallel and max_loaded_models must be >= 1, max_queue >= 0")
    if config.speed < 0:
        raise ConfigError("speed must be >= 0")
    names = [m.name for m in config.models]
    if len(set(names)) != len(names):
        raise ConfigError("duplicate model names in the catalogue")


def describe(config: SimConfig) -> dict[str, Any]:
    """The JSON view of the settings, for ``GET /_sim/config``."""
    return {
        "num_parallel": config.num_parallel,
        "max_queue": config.max_queue,
        "max_loaded_models": config.max_loaded_models,
        "keep_alive": -1 if config.keep_alive_s == FOREVER_S else config.keep_alive_s,
        "no_delay": config.no_delay,
        "speed": config.speed,
        "seed": config.seed,
        "models": [
            dict(
                dataclasses.asdict(m),
                capabilities=list(m.capabilities),
                families=list(m.families),
            )
            for m in config.models
        ],
    }
