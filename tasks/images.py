"""Image checks shared by producers and workers: is it a real PNG/JPEG/WebP/GIF under the cap?"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from tasks.errors import InvalidRequest

ALLOWED_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
}


@dataclass(frozen=True)
class ImageInfo:
    sha256: str
    mime: str
    width: int
    height: int
    size: int


def inspect_image(data: bytes, *, max_bytes: int, field: str = "images") -> ImageInfo:
    """Check that ``data`` is a whole PNG, JPEG, WebP or GIF image no larger than ``max_bytes``."""
    if not data:
        raise InvalidRequest(f"{field}: the image is empty", field=field)
    if len(data) > max_bytes:
        raise InvalidRequest(
            f"{field}: image of {len(data):,} bytes exceeds the {max_bytes:,}-byte limit "
            "(CORRAL_MAX_IMAGE_BYTES)",
            field=field,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or ""
                width, height = image.size
                image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Warning) as exc:
        raise InvalidRequest(
            f"{field}: not a readable image ({exc}); send PNG, JPEG, WebP or GIF", field=field
        ) from exc
    if fmt not in ALLOWED_FORMATS:
        raise InvalidRequest(
            f"{field}: {fmt or 'unknown'} images are not accepted; send PNG, JPEG, WebP or GIF",
            field=field,
        )
    return ImageInfo(
        sha256=hashlib.sha256(data).hexdigest(),
        mime=ALLOWED_FORMATS[fmt],
        width=width,
        height=height,
        size=len(data),
    )


def decode_base64_image(text: str, *, field: str = "images") -> bytes:
    """Decode standard base64 (a ``data:`` URI prefix is accepted and removed)."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{field}: not valid base64 ({exc})", field=field) from exc


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
