"""Pydantic payloads of the task kinds: the contract between producers and workers.

The parts every kind shares live here; each kind's own payload model lives in its module under
``tasks/kinds/`` (and stays importable from here by its name, e.g. ``GeneratePayload``).

The same models validate twice: at the producer, before anything is enqueued, and in the worker,
because a message may arrive by other roads (Flower's REST API, a raw ``send_task``). Limits come
from :class:`tasks.settings.Settings` through the validation context (see :func:`validate_payload`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.errors import InvalidRequest
from tasks.images import decode_base64_image, inspect_image
from tasks.keys import canonical_model
from tasks.settings import Settings
from tasks.untrusted import lone_surrogate, path_text, too_deep

_DEFAULT_LIMITS = Settings.model_construct()  # field defaults only; no environment read


def _limits(info: ValidationInfo) -> Settings:
    context = info.context or {}
    limits: Settings = context.get("limits", _DEFAULT_LIMITS)
    return limits


def limits_of(info: ValidationInfo) -> Settings:
    """The limits a validation runs with: :func:`validate_payload`'s settings, else defaults."""
    return _limits(info)


# The widest value Ollama can hold in each option: Go ``int`` is 64 bits, llama.cpp takes
# num_gpu, main_gpu and top_k as a C ``int`` (32 bits), and Ollama's float options are float32.
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
TYPE_BOUNDS: dict[str, tuple[float, str]] = {
    "seed": (INT64_MAX, "a 64-bit integer"),
    **dict.fromkeys(("num_gpu", "main_gpu", "top_k"), (INT32_MAX, "a 32-bit integer")),
    **dict.fromkeys(
        ("temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"),
        (FLOAT32_MAX, "a 32-bit float (±3.4e38)"),
    ),
}
# Options with no such bound (a 64-bit count of tokens or threads): the setting that caps each.
SETTING_BOUNDS = {
    "num_ctx": "max_num_ctx",
    "num_batch": "max_num_ctx",
    "num_keep": "max_num_ctx",
    "repeat_last_n": "max_num_ctx",
    "num_predict": "max_num_predict",
    "num_thread": "max_num_thread",
}


class Options(BaseModel):
    """Ollama runtime options. Unknown names are refused so that a typo never passes silently;
    each value is bounded by what Ollama can hold, or by a setting where nothing else bounds it."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    seed: int | None = None
    num_predict: int | None = Field(None, ge=-2)
    num_ctx: int | None = Field(None, gt=0)
    num_keep: int | None = Field(None, ge=-1)
    num_batch: int | None = Field(None, gt=0)
    num_gpu: int | None = Field(None, ge=-1)
    main_gpu: int | None = Field(None, ge=0)
    num_thread: int | None = Field(None, ge=0)
    use_mmap: bool | None = None
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=16
    )

    @field_validator(*TYPE_BOUNDS)
    @classmethod
    def _fits_ollama(cls, value: float | None, info: ValidationInfo) -> float | None:
        bound, kind = TYPE_BOUNDS[info.field_name or ""]
        lowest = -bound - 1 if isinstance(value, int) else -bound  # two's complement
        if value is not None and not lowest <= value <= bound:
            raise ValueError(f"{_shown(value)} does not fit in {kind}, which Ollama holds it in")
        return value

    @field_validator(*SETTING_BOUNDS)
    @classmethod
    def _within_settings(cls, value: int | None, info: ValidationInfo) -> int | None:
        setting = SETTING_BOUNDS[info.field_name or ""]
        limit = getattr(_limits(info), setting)
        if value is not None and value > limit:
            raise ValueError(
                f"{_shown(value)} is over the limit of {limit:,} (CORRAL_{setting.upper()}); "
                "ask for less, or raise that setting"
            )
        return value


def _shown(number: float) -> str:
    text = f"{number:,}"
    return text if len(text) <= 40 else f"a {len(str(abs(int(number))))}-digit number"


class ImagePart(BaseModel):
    """An image checked at the producer: inline base64 (``data``) or a reference to a blob."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mime: str
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    size: int = Field(gt=0)
    data: str | None = None  # base64; None means "stored in Redis under blob_key(sha256)"


def check_image_list(images: list[Any], info: ValidationInfo, field: str) -> list[Any]:
    limits = _limits(info)
    if len(images) > limits.max_images:
        raise ValueError(f"at most {limits.max_images} images are allowed, got {len(images)}")
    checked: list[Any] = []
    for index, image in enumerate(images):
        where = f"{field}[{index}]"
        if isinstance(image, str):  # raw base64, e.g. from Flower's REST API
            data = decode_base64_image(image, field=where)
            inspect_image(
                data,
                max_bytes=limits.max_image_bytes,
                max_pixels=limits.max_image_pixels,
                field=where,
            )
            checked.append(image)
        else:
            checked.append(ImagePart.model_validate(image))
    return checked


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    thinking: str | None = None
    images: list[ImagePart | str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_size(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"message of {len(value):,} characters exceeds {limit:,}")
        return value

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list):
            return check_image_list(value, info, "images")
        return value


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: dict[str, Any]

    @field_validator("function")
    @classmethod
    def _named(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("name"), str) or not value["name"]:
            raise ValueError("a tool's function needs a non-empty 'name'")
        return value


class BasePayload(BaseModel):
    """What every kind's payload has: the model and Ollama's runtime knobs."""

    model_config = ConfigDict(extra="forbid")

    model: str
    options: Options | None = None
    keep_alive: int | float | str | None = None

    @field_validator("model")
    @classmethod
    def _canonical(cls, value: str) -> str:
        try:
            return canonical_model(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: Any) -> Any:
        import re

        if isinstance(value, str) and not re.fullmatch(
            r"-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", value
        ):
            raise ValueError("keep_alive must be seconds (a number) or a duration such as '5m'")
        return value


def check_prompt(value: str | None, info: ValidationInfo) -> str | None:
    if value is not None:
        limit = _limits(info).max_prompt_chars
        if len(value) > limit:
            raise ValueError(f"prompt of {len(value):,} characters exceeds {limit:,}")
        if not value.strip():
            raise ValueError("prompt must not be empty")
    return value


def check_messages(value: list[Message] | None, info: ValidationInfo) -> list[Message] | None:
    if value is not None:
        limit = _limits(info).max_messages
        if not value:
            raise ValueError("messages must not be empty")
        if len(value) > limit:
            raise ValueError(f"{len(value)} messages exceed the limit of {limit}")
    return value


def check_schema(schema: Any, info: ValidationInfo) -> dict[str, Any]:
    limits = _limits(info)
    if not isinstance(schema, dict):
        raise ValueError("schema must be a JSON Schema object")
    # Depth first: json.dumps and the schema validator recurse, and fail on deep nesting.
    if too_deep(schema, limits.max_schema_depth) is not None:
        raise ValueError(f"schema nests deeper than {limits.max_schema_depth} levels")
    text = json.dumps(schema)
    if len(text) > limits.max_schema_bytes:
        raise ValueError(f"schema of {len(text):,} bytes exceeds {limits.max_schema_bytes:,}")
    from jsonschema import Draft202012Validator  # 3 MiB that only schema work needs
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    return schema


class PromptOrMessages(BasePayload):
    """A payload that takes either a prompt (with an optional system prompt) or messages."""

    prompt: str | None = None
    messages: list[Message] | None = None
    system: str | None = None

    _prompt = field_validator("prompt")(check_prompt)
    _messages = field_validator("messages")(check_messages)

    @model_validator(mode="after")
    def _one_of(self) -> PromptOrMessages:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    def as_messages(self) -> list[Message]:
        """The conversation to send to ``/api/chat``."""
        if self.messages is not None:
            return list(self.messages)
        head = [Message(role="system", content=self.system)] if self.system else []
        return [*head, Message(role="user", content=self.prompt or "")]


def validate_payload(kind: str, data: Any, limits: Settings | None = None) -> BasePayload:
    """Validate ``data`` as a ``kind`` payload, or raise :class:`InvalidRequest` naming a field."""
    from tasks.kinds import registry  # imported here: the kinds' modules import this one

    model = registry.get(kind).payload
    limits = limits or _DEFAULT_LIMITS
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", by_alias=True, exclude_none=True)
    check_untrusted(kind, data, limits)
    try:
        payload: BasePayload = model.model_validate(data, context={"limits": limits})
        return payload
    except ValidationError as exc:
        raise invalid_request_from(exc, kind) from exc


def check_untrusted(kind: str, data: Any, limits: Settings) -> None:
    """Refuse what would break the code after validation rather than the validation itself:
    nesting deeper than ``CORRAL_MAX_JSON_DEPTH`` (pydantic, ``json`` and Celery all recurse)
    and strings that cannot be encoded as UTF-8 (an unpaired surrogate such as ``"\\ud800"``)."""
    deep = too_deep(data, limits.max_json_depth)
    if deep is not None:
        field = path_text(deep[:1]) or kind
        raise InvalidRequest(
            f"invalid {kind} request: {field}: nests deeper than {limits.max_json_depth} levels "
            "of objects and arrays (CORRAL_MAX_JSON_DEPTH); flatten it",
            field=field,
        )
    bad = lone_surrogate(data)
    if bad is not None:
        field = path_text(bad) or kind
        raise InvalidRequest(
            f"invalid {kind} request: {field}: contains an unpaired UTF-16 surrogate, which is "
            "not valid Unicode (it cannot be encoded as UTF-8); send valid Unicode text",
            field=field,
        )


def invalid_request_from(exc: ValidationError, kind: str) -> InvalidRequest:
    """One readable line per problem, each naming its field (``messages.0.role: ...``)."""
    problems = []
    first_field = None
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or kind
        first_field = first_field or field
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{field}: {message}")
    return InvalidRequest(f"invalid {kind} request: " + "; ".join(problems), field=first_field)


def dump_payload(payload: BaseModel) -> dict[str, Any]:
    """The JSON form that travels in the broker message."""
    return payload.model_dump(mode="json", by_alias=True, exclude_none=True)


def __getattr__(name: str) -> Any:
    """Each kind's payload model by its name, and ``KINDS``, as this module exported them."""
    if not name.startswith("__"):
        from tasks import kinds

        if name == "KINDS":
            return kinds.KINDS
        for kind in kinds.registry:
            if kind.payload.__name__ == name:
                return kind.payload
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
