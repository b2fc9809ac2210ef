"""The chunked NDJSON decoder of the body pump, fed byte by byte and in odd pieces."""

from __future__ import annotations

import pytest

from workers.body_pump import ChunkedError, ChunkedLines

LINES = [b'{"response":"Hello","done":false}', b'{"response":" world","done":false}', b"{}"]


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return body + b"0\r\n" + trailer + b"\r\n"


def decode(data: bytes, step: int) -> tuple[list[bytes], ChunkedLines]:
    decoder = ChunkedLines()
    out: list[bytes] = []
    for at in range(0, len(data), step):
        out += decoder.feed(data[at : at + step])
    return out, decoder


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10_000])
def test_a_line_per_chunk_whatever_the_reads(step: int) -> None:
    data = chunked(*(line + b"\n" for line in LINES))
    out, decoder = decode(data, step)
    assert out == LINES and decoder.ended and not decoder.extra and not decoder.pending


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_lines_across_chunks_a_trailer_and_bytes_past_the_end(step: int) -> None:
    text = b"\n".join(LINES) + b"\n"
    data = chunked(text[:5], text[5:50], text[50:], trailer=b"X-Trailer: 1\r\n") + b"more"
    out, decoder = decode(data, step)
    assert out == LINES and decoder.ended and decoder.extra == 4


def test_a_line_still_waiting_for_its_newline() -> None:
    decoder = ChunkedLines()
    assert decoder.feed(chunked(b'{"a":1}\n{"b"')[:-5]) == [b'{"a":1}']
    assert decoder.pending and not decoder.ended


@pytest.mark.parametrize(
    "data",
    [b"zz\r\nab\r\n", b"2\r\nabXY", b"f" * 2000],
)
def test_broken_framing(data: bytes) -> None:
    with pytest.raises(ChunkedError):
        ChunkedLines().feed(data)
