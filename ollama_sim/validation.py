"""Request bodies decoded and type-checked the way Go's ``encoding/json`` does for Ollama's structs.

Only the checks whose errors a client can observe are reproduced: the JSON syntax, the type of
each known field (``json: cannot unmarshal ...``), base64 images, ``keep_alive`` and ``think``.
Keys match their fields case-insensitively and unknown fields are ignored, as in Go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .gojson import decode_json_body
from .golike import GoError, OutOfRange, decode_go_base64, parse_keep_alive


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float | OutOfRange):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass(frozen=True)
class GoType:
    """A Go field type: its printed name, a check for scalar JSON values, and its parts."""

    name: str
    accepts: Callable[[Any], bool] = lambda v: True
    elem: GoType | None = None
    fields: dict[str, GoType] | None = None


STRING = GoType("string", lambda v: isinstance(v, str))
BOOL = GoType("bool", lambda v: isinstance(v, bool))
INT = GoType("int", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
ANY = GoType("interface {}")
RAW = GoType("json.RawMessage")
MAP = GoType("map[string]interface {}", lambda v: isinstance(v, dict))
CUSTOM = GoType("custom")  # decoded by its own function below


def _slice(name: str, elem: GoType) -> GoType:
    return GoType(name, lambda v: isinstance(v, list), elem=elem)


def _struct(name: str, fields: dict[str, GoType]) -> GoType:
    return GoType(name, lambda v: isinstance(v, dict), fields=fields)


IMAGES = _slice("[]api.ImageData", GoType("api.ImageData", lambda v: isinstance(v, str)))
TOOL_CALL = _struct(
    "api.ToolCall",
    {
        "id": STRING,
        "function": _struct(
            "api.ToolCallFunction", {"index": INT, "name": STRING, "arguments": MAP}
        ),
    },
)
MESSAGE = _struct(
    "api.Message",
    {
        "role": STRING,
        "content": STRING,
        "thinking": STRING,
        "images": IMAGES,
        "tool_calls": _slice("[]api.ToolCall", TOOL_CALL),
        "tool_name": STRING,
        "tool_call_id": STRING,
    },
)
TOOL = _struct(
    "api.Tool",
    {
        "type": STRING,
        "function": _struct(
            "api.ToolFunction", {"name": STRING, "description": STRING, "parameters": ANY}
        ),
    },
)
_COMMON = {
    "model": STRING,
    "keep_alive": CUSTOM,
    "options": MAP,
    "think": CUSTOM,
    "truncate": BOOL,
    "shift": BOOL,
    "logprobs": BOOL,
    "top_logprobs": INT,
    "stream": BOOL,
    "format": RAW,
}

GENERATE = _struct(
    "api.GenerateRequest",
    {
        **_COMMON,
        "prompt": STRING,
        "suffix": STRING,
        "system": STRING,
        "template": STRING,
        "context": _slice("[]int", INT),
        "raw": BOOL,
        "images": IMAGES,
    },
)
CHAT = _struct(
    "api.ChatRequest",
    {
        **_COMMON,
        "messages": _slice("[]api.Message", MESSAGE),
        "tools": _slice("api.Tools", TOOL),
    },
)
EMBED = _struct(
    "api.EmbedRequest",
    {
        "model": STRING,
        "input": ANY,
        "truncate": BOOL,
        "dimensions": INT,
        "keep_alive": CUSTOM,
        "options": MAP,
    },
)
EMBEDDINGS = _struct(
    "api.EmbeddingRequest",
    {
        "model": STRING,
        "prompt": STRING,
        "keep_alive": CUSTOM,
        "options": MAP,
    },
)
SHOW = _struct(
    "api.ShowRequest",
    {
        "model": STRING,
        "name": STRING,
        "system": STRING,
        "template": STRING,
        "verbose": BOOL,
        "options": MAP,
    },
)
PULL = _struct(
    "api.PullRequest",
    {
        "model": STRING,
        "name": STRING,
        "insecure": BOOL,
        "stream": BOOL,
        "username": STRING,
        "password": STRING,
    },
)

_THINK_LEVELS = ("high", "medium", "low")


def _field_name(key: str, fields: dict[str, GoType]) -> str | None:
    """The struct field a JSON key fills: an exact match first, else a case-insensitive one
    (Go's ``encoding/json`` accepts ``{"Model": ...}`` for ``model``)."""
    if key in fields:
        return key
    folded = key.casefold()
    return next((name for name in fields if name.casefold() == folded), None)


def _checked(value: Any, gotype: GoType, path: str) -> Any:
    """``value`` type-checked against ``gotype``, with struct keys renamed to their fields."""
    if value is None or gotype is RAW or gotype is CUSTOM:
        return value  # json.RawMessage keeps even numbers beyond a float64 as text
    if isinstance(value, OutOfRange):  # into an int or an interface: Go quotes the number
        kind = f"number {value.text}" if gotype is INT or gotype is ANY else "number"
        name = "float64" if gotype is ANY else gotype.name
        raise ApiError(
            400, f"json: cannot unmarshal {kind} into Go struct field {path} of type {name}"
        )
    if gotype is ANY:
        _refuse_out_of_range(value, path)
        return value
    if not gotype.accepts(value):
        kind = _json_kind(value)
        if gotype is INT and kind == "number":
            kind = f"number {value}"
        raise ApiError(
            400, f"json: cannot unmarshal {kind} into Go struct field {path} of type {gotype.name}"
        )
    if gotype is INT and isinstance(value, float) and not value.is_integer():
        raise ApiError(
            400, f"json: cannot unmarshal number {value} into Go struct field {path} of type int"
        )
    if gotype is MAP:
        _refuse_out_of_range(value, path)
    if gotype.elem is not None:
        return [_checked(item, gotype.elem, path) for item in value]
    if gotype.fields is not None:
        return _checked_fields(value, gotype.fields, path)
    return value


def _refuse_out_of_range(value: Any, path: str) -> None:
    """Go decodes every number inside an ``interface {}`` as a float64, and fails past it."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, OutOfRange):
            raise ApiError(
                400,
                f"json: cannot unmarshal number {node.text} into Go struct "
                f"field {path} of type float64",
            )
        if isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))


def _checked_fields(value: dict[str, Any], fields: dict[str, GoType], path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in value.items():  # a later key for the same field wins, as in Go
        name = _field_name(key, fields)
        if name is not None:
            out[name] = _checked(item, fields[name], f"{path}.{name}")
    return out


def decode(body: bytes, struct: GoType) -> dict[str, Any]:
    """Decode a request body into a dict of known-good field values (unknown keys dropped)."""
    try:
        value = decode_json_body(body)
    except EOFError:
        raise ApiError(400, "missing request body") from None
    except GoError as exc:
        raise ApiError(400, str(exc)) from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(
            400, f"json: cannot unmarshal {_json_kind(value)} into Go value of type {struct.name}"
        )
    assert struct.fields is not None
    name = struct.name.removeprefix("api.")
    value = _checked_fields(value, struct.fields, name)
    if isinstance(value.get("keep_alive"), OutOfRange):  # api.Duration decodes it as any
        raise ApiError(
            400,
            f"json: cannot unmarshal number {value['keep_alive'].text} into Go "
            f"struct field {name}.keep_alive of type float64",
        )
    try:
        if "keep_alive" in struct.fields:
            value["keep_alive"] = parse_keep_alive(value.get("keep_alive"))
    except GoError as exc:
        raise ApiError(400, str(exc)) from exc
    if "think" in struct.fields:
        value["think"] = _think(value.get("think"))
    return value


def _think(value: Any) -> bool | str | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in _THINK_LEVELS:
            raise ApiError(
                400,
                f'invalid think value: "{value}" (must be "high", "medium", "low", true, or false)',
            )
        return value
    raise ApiError(
        400, 'think must be a boolean or string ("high", "medium", "low", true, or false)'
    )


def decode_images(images: list[str] | None) -> list[bytes]:
    """Decode base64 image strings (Go's ``[]byte`` JSON binding)."""
    out = []
    for text in images or ():
        try:
            out.append(decode_go_base64(text))
        except GoError as exc:
            raise ApiError(400, str(exc)) from exc
    return out


# Option types as Go's api.Options declares them, for "option %q must be of type ..." errors.
_INT_OPTIONS = frozenset(
    [
        "num_keep",
        "seed",
        "num_predict",
        "top_k",
        "repeat_last_n",
        "mirostat",
        "num_ctx",
        "num_batch",
        "num_gpu",
        "main_gpu",
        "num_thread",
        "draft_num_predict",
        "num_gqa",
    ]
)
_FLOAT_OPTIONS = frozenset(
    [
        "top_p",
        "min_p",
        "typical_p",
        "temperature",
        "repeat_penalty",
        "presence_penalty",
        "frequency_penalty",
        "tfs_z",
        "mirostat_tau",
        "mirostat_eta",
    ]
)
_BOOL_OPTIONS = frozenset(
    ["use_mmap", "numa", "low_vram", "f16_kv", "vocab_only", "use_mlock", "penalize_newline"]
)


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Validate option types; errors are 500s because Ollama raises them while scheduling."""
    options = options or {}
    for key, value in options.items():
        if value is None:
            continue
        if key in _INT_OPTIONS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ApiError(500, f'option "{key}" must be of type integer')
        if key in _FLOAT_OPTIONS and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise ApiError(500, f'option "{key}" must be of type float32')
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            raise ApiError(500, f'option "{key}" must be of type boolean')
        if key == "stop":
            if not isinstance(value, list):
                raise ApiError(500, f'option "{key}" must be of type array')
            if not all(isinstance(item, str) for item in value):
                raise ApiError(500, f'option "{key}" must be of an array of strings')
    return {k: v for k, v in options.items() if v is not None}


def check_format(fmt: Any) -> dict[str, Any] | str | None:
    """Return ``"json"``, a schema dict, or None; anything else is the runner's 500 error."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    from .gojson import dumps

    raw = dumps(fmt, default=str)  # a number beyond a float64 stays as its text, as in Go
    quoted = dumps(raw)
    raise ApiError(500, f'invalid format: {quoted}; expected "json" or a valid JSON Schema object')
