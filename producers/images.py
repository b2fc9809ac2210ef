"""Turn images given as paths, bytes or base64 into checked parts; large ones go by reference."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel

from tasks.errors import InvalidRequest
from tasks.images import decode_base64_image, encode_base64, inspect_image
from tasks.keys import blob_key
from tasks.kinds.base import ImageInput
from tasks.payloads import ImagePart
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
    images: Iterable[ImageInput], settings: Settings, field: str = "images"
) -> list[dict[str, Any]]:
    """Check each image and describe it as a part carrying its data; nothing is stored yet.

    :func:`store_large_images` moves the large ones to Redis once the whole payload validated.
    """
    if isinstance(images, str | bytes | bytearray | Path) or not isinstance(images, Iterable):
        raise InvalidRequest(
            f"{field}: expected a list of images (paths, bytes or base64 text), got "
            f"{type(images).__name__}",
            field=field,
        )
    parts = []
    for index, image in enumerate(images):
        where = f"{field}[{index}]"
        data = load_image_bytes(image, where)
        info = inspect_image(
            data,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            field=where,
        )
        parts.append(
            {
                "sha256": info.sha256,
                "mime": info.mime,
                "width": info.width,
                "height": info.height,
                "size": info.size,
                "data": encode_base64(data),
            }
        )
    return parts


def large_images(payload: BaseModel, settings: Settings) -> list[ImagePart]:
    """The validated payload's images over the inline limit, not stored yet."""
    messages = getattr(payload, "messages", None) or []
    images = [
        *(getattr(payload, "images", None) or []),
        *(i for m in messages for i in m.images or []),
    ]
    return [
        part
        for part in images
        if isinstance(part, ImagePart)
        and part.data is not None
        and part.size > settings.inline_image_max_bytes
    ]


def store_large_images(client: redis.Redis, payload: BaseModel, settings: Settings) -> None:
    """Store the validated payload's images over the inline limit once in Redis (keyed by
    sha256) and send them by reference; the payload's parts are changed in place."""
    large = large_images(payload, settings)
    if not large:
        return
    pipe = client.pipeline(transaction=False)
    for part in large:
        key = blob_key(part.sha256)
        pipe.set(key, decode_base64_image(part.data or ""), ex=settings.blob_ttl_s, nx=True)
        pipe.expire(key, settings.blob_ttl_s)
    pipe.execute()
    for part in large:  # only once stored: a retry after a Redis error stores them again
        part.data = None
