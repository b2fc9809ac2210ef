"""A batch's input file: named by its content (``file-<sha256>``), read a line at a time.

The id is what a batch records as its ``input_file_id``. Lines given as Python objects are
spooled to a file under ``CORRAL_BATCH_DIR/files/`` first, so every batch reads a file, and a
resumed submission reads exactly the same lines again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.errors import InvalidRequest

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class InputFile:
    path: Path
    file_id: str
    lines: int
    bytes: int


def describe(path: Path) -> InputFile:
    """Hash and count a file's lines in one streamed pass."""
    digest, lines, size = hashlib.sha256(), 0, 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_BYTES):
                digest.update(chunk)
                lines += chunk.count(b"\n")
                size += len(chunk)
    except OSError as exc:
        raise InvalidRequest(
            f"cannot read {path}: {exc.strerror}; give a readable JSONL file", field="file"
        ) from exc
    if size and not _ends_with_newline(path):
        lines += 1
    return InputFile(path, "file-" + digest.hexdigest()[:32], lines, size)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def spool(items: Iterable[dict[str, Any] | str], root: Path) -> InputFile:
    """Write lines (dicts or JSON text) to ``root/files/<file id>.jsonl``, one at a time."""
    folder = root.expanduser() / "files"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=folder, suffix=".part", delete=False) as out:
        for item in items:
            text = item if isinstance(item, str) else json.dumps(item, ensure_ascii=False)
            out.write(text.strip().encode() + b"\n")
    described = describe(Path(out.name))
    final = folder / f"{described.file_id}.jsonl"
    os.replace(out.name, final)
    return InputFile(final, described.file_id, described.lines, described.bytes)


def lines_of(path: Path) -> Iterator[bytes]:
    """The file's lines, read as they are needed."""
    with open(path, "rb") as handle:
        yield from handle
