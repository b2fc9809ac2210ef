"""Turn images given as paths, bytes or base64 into checked parts; large ones go by reference."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis

from tasks.errors import InvalidRequest
from tasks.images import decode_base64_image, encode_base64, inspect_image
from tasks.keys import blob_key
from tasks.kinds.base import ImageInput
from tasks.settings import Settings

_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


def load_image_bytes(image: ImageInput, field: str) -> bytes:
    """Bytes from a path, raw bytes, or base64 text (as the ollama client accepts them)."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, Path):
        return _read(image, field)
    if isinstance(image, str):
        if len(image) < 4096 and (Path(image).is_file() or image.lower().endswith(_FILE_SUFFIXES)):
            return _read(Path(image), field)
        return decode_base64_image(image, field=field)
    raise InvalidRequest(f"{field}: expected a path, bytes or base64 text", field=field)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.expanduser().read_bytes()
    except OSError as exc:
        raise InvalidRequest(
            f"{field}: cannot read image file {str(path)!r}: {exc.strerror}", field=field
        ) from exc


def prepare_images(
    client: redis.Redis, images: Iterable[ImageInput], settings: Settings, field: str = "images"
) -> list[dict[str, Any]]:
    """Check each image; store those over the inline limit once in Redis, keyed by sha256."""
    parts = []
    for index, image in enumerate(images):
        where = f"{field}[{index}]"
        data = load_image_bytes(image, where)
        info = inspect_image(data, max_bytes=settings.max_image_bytes, field=where)
        part: dict[str, Any] = {
            "sha256": info.sha256,
            "mime": info.mime,
            "width": info.width,
            "height": info.height,
            "size": info.size,
        }
        if info.size > settings.inline_image_max_bytes:
            key = blob_key(info.sha256)
            pipe = client.pipeline(transaction=False)
            pipe.set(key, data, ex=settings.blob_ttl_s, nx=True)
            pipe.expire(key, settings.blob_ttl_s)
            pipe.execute()
        else:
            part["data"] = encode_base64(data)
        parts.append(part)
    return parts
