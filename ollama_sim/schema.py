"""Build a JSON document that validates against a JSON Schema (for ``format``).

Covers what pydantic's ``model_json_schema()`` and hand-written schemas use: objects (required,
optional and additional properties), arrays (items, prefixItems, minItems/maxItems), strings
(enum, const, min/maxLength, common formats), numbers and integers with bounds, booleans, null,
``$ref`` into ``$defs``/``definitions``, ``anyOf``/``oneOf`` (first branch) and ``allOf``.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

_WORDS = (
    "alpha",
    "bright",
    "cedar",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kestrel",
    "lumen",
    "meadow",
    "nimbus",
    "orchid",
    "pebble",
    "quartz",
    "river",
    "summit",
    "timber",
    "umber",
    "violet",
    "willow",
    "zephyr",
)
_MAX_DEPTH = 8
"""Below this depth only required properties are generated."""
_HARD_DEPTH = 32
"""Nothing is generated below this depth (it also ends ``$ref`` cycles)."""
ROOM_CHARS = 1_000_000
"""About the largest document generated: a schema cannot make the simulator build more (a real
model would be stopped by its token budget anyway)."""


class SchemaGenerator:
    """Deterministic instances of one schema (the root is used to resolve ``$ref``)."""

    def __init__(
        self, root: dict[str, Any], rng: random.Random, hint_words: list[str] | None = None
    ):
        self._root = root
        self._rng = rng
        self._hints = hint_words or []
        self._room = ROOM_CHARS  # characters left to generate

    def generate(self) -> Any:
        return self._value(self._root, 0, "")

    def _resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self._root
        if not ref.startswith("#"):
            return {}
        for part in ref.lstrip("#/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return node if isinstance(node, dict) else {}

    def _value(self, schema: Any, depth: int, name: str) -> Any:
        if depth > _HARD_DEPTH or self._room <= 0:
            return None
        self._room -= 8
        if schema is True or not isinstance(schema, dict):
            return self._string({}, name)
        if "$ref" in schema:
            merged = dict(self._resolve(schema["$ref"]))
            merged.update({k: v for k, v in schema.items() if k != "$ref"})
            return self._value(merged, depth + 1, name)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self._rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                rest = {k: v for k, v in schema.items() if k != key}
                return self._value({**rest, **schema[key][0]}, depth + 1, name)
        if schema.get("allOf"):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if "$ref" in part else part
                merged = _merge(merged, part)
            return self._value(merged, depth + 1, name)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "object":
            return self._object(schema, depth, name)
        if kind == "array":
            return self._array(schema, depth, name)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema, name)

    def _object(self, schema: dict[str, Any], depth: int, name: str) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for key, sub in props.items():
            if depth < _MAX_DEPTH or key in required:
                out[key] = self._value(sub, depth + 1, key)
        for key in required - set(out):
            extra = schema.get("additionalProperties")
            out[key] = self._value(extra if isinstance(extra, dict) else {}, depth + 1, key)
        extra = schema.get("additionalProperties")
        if not props and isinstance(extra, dict) and depth < _MAX_DEPTH:
            for i in range(max(1, _count(schema.get("minProperties"), 1))):
                if self._room <= 0:
                    break
                out[f"{self._rng.choice(_WORDS)}_{i}"] = self._value(extra, depth + 1, name)
        return out

    def _array(self, schema: dict[str, Any], depth: int, name: str) -> list[Any]:
        prefix = schema.get("prefixItems") or []
        low = min(_count(schema.get("minItems"), 0), max(0, self._room))
        high = _count(schema.get("maxItems"), max(low, 3))
        count = (
            low
            if depth >= _MAX_DEPTH
            else self._rng.randint(max(low, min(1, high)), max(low, min(high, 3)))
        )
        count = max(count, min(len(prefix), high))
        items = schema.get("items", {})
        out = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            if sub is False or self._room <= 0:
                break
            out.append(self._value(sub, depth + 1, name))
        if schema.get("uniqueItems"):
            seen: set[str] = set()
            unique: list[Any] = []
            for item in out:
                key = json.dumps(item, sort_keys=True, default=str)
                if key not in seen:
                    seen.add(key)
                    unique.append(item)
            out = unique if len(unique) >= low else out
        return out

    def _integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema, integer=True)
        value = self._rng.randint(low, high)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            value = min(high, max(low, (value // step) * step))
            if value % step:
                value = math.ceil(low / step) * step
        return value

    def _number(self, schema: dict[str, Any]) -> float | int:
        low, high = _bounds(schema, integer=False)
        step = _number(schema.get("multipleOf"))
        if step and step > 0 and abs(high - low) / step < 1e15:
            first = math.ceil(low / step)
            last = math.floor(high / step)
            return self._rng.randint(first, max(first, last)) * step
        return round(self._rng.uniform(low, high), 2) if high > low else low

    def _string(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        if fmt == "date-time":
            text = f"2025-0{self._rng.randint(1, 9)}-1{self._rng.randint(0, 9)}T10:30:00Z"
        elif fmt == "date":
            text = f"2025-0{self._rng.randint(1, 9)}-1{self._rng.randint(0, 9)}"
        elif fmt == "time":
            text = "10:30:00"
        elif fmt == "email":
            text = f"{self._rng.choice(_WORDS)}@example.com"
        elif fmt in ("uri", "url"):
            text = f"https://example.com/{self._rng.choice(_WORDS)}"
        elif fmt == "uuid":
            a, b, c, d, e = (self._rng.getrandbits(n) for n in (32, 16, 12, 12, 48))
            text = f"{a:08x}-{b:04x}-4{c:03x}-a{d:03x}-{e:012x}"
        elif self._hints and name.lower() in ("city", "location", "name", "place", "country"):
            text = self._hints[0]
        else:
            words = [self._rng.choice(_WORDS) for _ in range(self._rng.randint(1, 3))]
            text = " ".join(words)
        low = min(_count(schema.get("minLength"), 0), max(0, self._room))
        high = schema.get("maxLength")
        words, size = [text], len(text)
        while size < low:  # joined once: adding to the text each time would be quadratic
            words.append(self._rng.choice(_WORDS))
            size += 1 + len(words[-1])
        text = " ".join(words)
        if high is not None:
            text = text[: _count(high, len(text))]
        self._room -= len(text)
        return text


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    merged = dict(left)
    for key, value in right.items():
        if key == "properties":
            merged[key] = {**merged.get(key, {}), **value}
        elif key == "required":
            merged[key] = sorted(set(merged.get(key, [])) | set(value))
        else:
            merged.setdefault(key, value)
    return merged


def _number(value: Any) -> float | int | None:
    """A finite JSON number, or None (a schema may hold anything where a bound should be)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) and abs(value) < 1e300 else None


def _count(value: Any, default: int) -> int:
    """A non-negative count (minItems, maxLength...), or ``default`` when it is not one."""
    number = _number(value)
    return int(number) if number is not None and number >= 0 else default


def _bounds(schema: dict[str, Any], integer: bool) -> tuple[Any, Any]:
    low: Any = _number(schema.get("minimum"))
    high: Any = _number(schema.get("maximum"))
    tiny = 1 if integer else 0.01
    if _number(schema.get("exclusiveMinimum")) is not None:
        low = schema["exclusiveMinimum"] + tiny
    if _number(schema.get("exclusiveMaximum")) is not None:
        high = schema["exclusiveMaximum"] - tiny
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        low = high - 100
    elif high is None:
        high = low + 100
    if integer:
        low, high = math.ceil(low), math.floor(high)
    return low, max(low, high)


def instance_for(schema: dict[str, Any], seed: int, hint_words: list[str] | None = None) -> Any:
    """A deterministic document that satisfies ``schema``."""
    return SchemaGenerator(schema, random.Random(seed), hint_words).generate()


def break_instance(schema: dict[str, Any], document: Any) -> Any:
    """Return a copy of ``document`` that no longer satisfies ``schema`` (None: cannot)."""
    required = schema.get("required") if isinstance(schema, dict) else None
    if isinstance(document, dict) and required:
        broken = dict(document)
        broken.pop(required[0], None)
        return broken
    return None
