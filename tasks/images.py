"""Image checks shared by producers and workers: is it a real PNG/JPEG/WebP/GIF within the caps?"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

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


def inspect_image(
    data: bytes, *, max_bytes: int, max_pixels: int, field: str = "images"
) -> ImageInfo:
    """Check that ``data`` is a whole PNG, JPEG, WebP or GIF image within the byte and pixel caps.

    Pillow reads the header and checks the file's structure (``verify``) without decoding a
    pixel, so a small file that claims a huge size (a decompression bomb) costs nothing.
    """
    from PIL import Image, UnidentifiedImageError  # 2 MiB that only image work needs

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
            # Our own pixel cap decides; Pillow still raises DecompressionBombError past twice
            # its MAX_IMAGE_PIXELS (about 179 million), whatever CORRAL_MAX_IMAGE_PIXELS says.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format or ""
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_many_pixels(field, max_pixels, f"{width:,}×{height:,}")
                image.verify()
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(field, max_pixels, "larger than that") from exc
    except UnidentifiedImageError as exc:
        kind = _looks_like(data)
        raise InvalidRequest(
            f"{field}: not an image Pillow can read{f' ({kind})' if kind else ''}; "
            "send PNG, JPEG, WebP or GIF",
            field=field,
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(
            f"{field}: a damaged or truncated image ({exc}); send the whole file as PNG, JPEG, "
            "WebP or GIF",
            field=field,
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


def _too_many_pixels(field: str, max_pixels: int, size: str) -> InvalidRequest:
    return InvalidRequest(
        f"{field}: the image is {size} pixels, over the {max_pixels:,}-pixel limit "
        "(CORRAL_MAX_IMAGE_PIXELS); scale it down",
        field=field,
    )


_SIGNATURES = (
    (b"%pdf", "a PDF document"),
    (b"<svg", "an SVG drawing"),
    (b"<?xml", "an XML document"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"pk\x03\x04", "a ZIP archive"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def _looks_like(data: bytes) -> str:
    """What non-image bytes seem to be, for the error message ("" when unknown)."""
    head = data[:64].lstrip().lower()
    for signature, name in _SIGNATURES:
        if head.startswith(signature):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "a HEIC or AVIF photo: convert it to JPEG"
    head = data[:512]
    try:
        sample = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return ""
        sample = head[: exc.start].decode("utf-8")
    return "text" if all(c.isprintable() or c in "\r\n\t" for c in sample) else ""


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
