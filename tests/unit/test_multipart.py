"""Tests for the streaming multipart/form-data parser behind ``POST /v1/files``."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest

from batchyard.api.multipart import (
    FLUSH_BYTES,
    MAX_WRITE_BYTES,
    FileSink,
    MultipartError,
    ParsedForm,
    PartTooLarge,
    parse_upload,
)

CHUNK_SIZES: list[int | None] = [1, 7, 4096, 65536, None]  # None: the whole body in one chunk
CHUNK_IDS = ["1", "7", "4096", "65536", "whole"]
BOUNDARY = "b0undary-XyZ"
CT = f"multipart/form-data; boundary={BOUNDARY}"


class MemorySink:
    """Test sink: records every write."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes: list[int] = []

    async def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        assert data, "empty writes are pointless"
        self.writes.append(len(data))
        self.data += data


class Opener:
    """``open_sink`` callable that counts its calls."""

    def __init__(self, sink: FileSink | None = None) -> None:
        self.sink: FileSink = sink if sink is not None else MemorySink()
        self.calls = 0

    async def __call__(self) -> FileSink:
        self.calls += 1
        return self.sink

    @property
    def mem(self) -> MemorySink:
        assert isinstance(self.sink, MemorySink)
        return self.sink


class Feeder:
    """Async iterator over ``body`` in chunks; records how much was consumed."""

    def __init__(self, body: bytes, size: int | None) -> None:
        self.body = body
        self.size = size or max(len(body), 1)
        self.consumed = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.body), self.size):
            chunk = self.body[i : i + self.size]
            self.consumed += len(chunk)
            yield chunk


def encode(files: Any = None, data: Any = None) -> tuple[str, bytes]:
    req = httpx.Request("POST", "http://test/v1/files", files=files, data=data)
    return req.headers["content-type"], req.read()


def hand_body(
    parts: Iterable[tuple[list[str], bytes]], boundary: str = BOUNDARY, close: bool = True
) -> bytes:
    out = bytearray()
    for headers, payload in parts:
        out += f"--{boundary}\r\n".encode()
        for h in headers:
            out += h.encode("utf-8") + b"\r\n"
        out += b"\r\n" + payload + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return bytes(out)


async def run(
    ct: str | None, body: bytes, size: int | None, opener: Opener | None = None, **kw: Any
) -> tuple[ParsedForm, Opener, Feeder]:
    opener = opener or Opener()
    feeder = Feeder(body, size)
    kw.setdefault("max_file_bytes", 512 * 1024 * 1024)
    form = await parse_upload(ct, aiter(feeder), opener, **kw)
    return form, opener, feeder


chunk_sizes = pytest.mark.parametrize("size", CHUNK_SIZES, ids=CHUNK_IDS)


# --------------------------------------------------------------------------- happy paths


@chunk_sizes
async def test_httpx_upload_fields_and_file(size: int | None) -> None:
    content = b'{"custom_id": "r1", "method": "POST"}\n' * 300
    ct, body = encode(
        files={"file": ("batch_input.jsonl", content, "application/jsonl")},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
    )
    form, opener, _ = await run(ct, body, size)
    assert form.fields == {
        "purpose": "batch",
        "expires_after[anchor]": "created_at",
        "expires_after[seconds]": "3600",
    }
    assert form.filename == "batch_input.jsonl"
    assert form.file_content_type == "application/jsonl"
    assert form.file_bytes == len(content)
    assert opener.calls == 1
    assert bytes(opener.mem.data) == content


@chunk_sizes
async def test_unicode_filename_from_httpx(size: int | None) -> None:
    name = "données_批处理 ü 🚀.jsonl"
    ct, body = encode(files={"file": (name, b"x\n")}, data={"purpose": "batch"})
    form, _, _ = await run(ct, body, size)
    assert form.filename == name


@chunk_sizes
async def test_malicious_filenames_kept_verbatim(size: int | None) -> None:
    for name in ["../../etc/passwd", "..\\..\\windows\\system32", "/abs/path", "a;b=c.jsonl"]:
        ct, body = encode(files={"file": (name, b"data")})
        form, _, _ = await run(ct, body, size)
        assert form.filename == name


async def test_filename_star_takes_precedence() -> None:
    body = hand_body(
        [
            (
                [
                    'Content-Disposition: form-data; name="file"; filename="fallback.txt"; '
                    "filename*=UTF-8''r%C3%A9sum%C3%A9%20%E2%82%AC.jsonl"
                ],
                b"abc",
            )
        ]
    )
    form, _, _ = await run(CT, body, None)
    assert form.filename == "résumé €.jsonl"

    # filename* alone, case-insensitive charset and parameter name
    body = hand_body([(["Content-Disposition: form-data; name=file; FILENAME*=utf-8'en'%2E%2E%2Fx"], b"")])
    form, _, _ = await run(CT, body, None)
    assert form.filename == "../x"

    # an undecodable filename* falls back to filename=
    body = hand_body(
        [(["Content-Disposition: form-data; name=file; filename*=UTF-8''%FF%FE; filename=plain"], b"")]
    )
    form, _, _ = await run(CT, body, None)
    assert form.filename == "plain"

    # ... and is an error on its own
    body = hand_body([(["Content-Disposition: form-data; name=file; filename*=UTF-8''%FF"], b"")])
    with pytest.raises(MultipartError) as ei:
        await run(CT, body, None)
    assert ei.value.param == "file"


async def test_raw_utf8_and_quoted_filename() -> None:
    body = hand_body(
        [(['Content-Disposition: form-data; name="file"; filename="a \\"q\\" \\\\ C:\\dir ü.txt"'], b"1")]
    )
    form, _, _ = await run(CT, body, None)
    # \" and \\ are unescaped, a lone backslash (Windows path from a browser) is kept
    assert form.filename == 'a "q" \\ C:\\dir ü.txt'


async def test_filename_capped_at_1024_chars() -> None:
    ct, body = encode(files={"file": ("x" * 3000, b"1")})
    form, _, _ = await run(ct, body, 4096)
    assert form.filename == "x" * 1024


@chunk_sizes
async def test_binary_content_with_fake_boundaries(size: int | None) -> None:
    b = BOUNDARY.encode()
    tricky = [
        b"\r\n--",
        b"\r\n--" + b[:-1] + (b"Q" if b[-1:] != b"Q" else b"R"),  # almost the delimiter (last byte differs)
        b"\r\n--" + b[:5],
        b"--" + b + b"\r\n",  # boundary text without the leading CRLF is data
        b"\r\n---\r\n--\r\n",
        b"\r\r\n\n--\r",
        b"\x00\xff" * 50,
    ]
    rnd = random.Random(size or 0).randbytes(9000)
    content = b"".join(t + rnd[i * 1000 : (i + 1) * 1000] for i, t in enumerate(tricky)) + b"\r\n-"
    body = hand_body(
        [
            (['Content-Disposition: form-data; name="purpose"'], b"batch"),
            (
                [
                    'Content-Disposition: form-data; name="file"; filename="blob.bin"',
                    "Content-Type: application/octet-stream",
                ],
                content,
            ),
        ]
    )
    form, opener, _ = await run(CT, body, size)
    assert bytes(opener.mem.data) == content
    assert form.file_bytes == len(content)
    assert form.fields == {"purpose": "batch"}
    assert form.file_content_type == "application/octet-stream"


@chunk_sizes
async def test_random_binary_via_httpx(size: int | None) -> None:
    content = os.urandom(200_000 if size not in (1, 7) else 20_000)
    ct, body = encode(
        files={"file": ("r.bin", content, "application/octet-stream")}, data={"purpose": "batch"}
    )
    form, opener, _ = await run(ct, body, size)
    assert bytes(opener.mem.data) == content
    assert form.file_bytes == len(content)


@pytest.mark.parametrize("size", [4096, 65536, None], ids=["4096", "65536", "whole"])
async def test_write_batching(size: int | None) -> None:
    content = os.urandom(3 * 1024 * 1024 + 12345)
    ct, body = encode(files={"file": ("big.bin", content)})
    form, opener, _ = await run(ct, body, size)
    sink = opener.mem
    assert bytes(sink.data) == content
    assert sum(sink.writes) == form.file_bytes == len(content)
    assert all(w <= MAX_WRITE_BYTES for w in sink.writes)
    # batched: every write but the last is at least FLUSH_BYTES
    assert all(w >= FLUSH_BYTES for w in sink.writes[:-1])
    assert len(sink.writes) <= len(content) // FLUSH_BYTES + 1


@chunk_sizes
async def test_empty_file_opens_sink(size: int | None) -> None:
    ct, body = encode(files={"file": ("empty.jsonl", b"")}, data={"purpose": "batch"})
    form, opener, _ = await run(ct, body, size)
    assert form.filename == "empty.jsonl"
    assert form.file_bytes == 0
    assert opener.calls == 1
    assert opener.mem.writes == []


@chunk_sizes
async def test_missing_file_part(size: int | None) -> None:
    # (httpx only encodes multipart when files are given, so build the body by hand)
    body = hand_body([(['Content-Disposition: form-data; name="purpose"'], b"batch")])
    form, opener, _ = await run(CT, body, size)
    assert form.filename is None
    assert form.file_bytes == 0
    assert form.fields == {"purpose": "batch"}
    assert opener.calls == 0


async def test_file_field_without_filename_is_a_plain_field() -> None:
    body = hand_body([(['Content-Disposition: form-data; name="file"'], b"not a file")])
    form, opener, _ = await run(CT, body, None)
    assert form.filename is None
    assert form.fields == {"file": "not a file"}
    assert opener.calls == 0


async def test_custom_file_field_name() -> None:
    ct, body = encode(files={"upload": ("u.txt", b"hello")}, data={"purpose": "batch"})
    form, opener, _ = await run(ct, body, 7, file_field="upload")
    assert form.filename == "u.txt"
    assert bytes(opener.mem.data) == b"hello"


async def test_content_type_variants() -> None:
    body = hand_body([(['Content-Disposition: form-data; name="file"; filename="f"'], b"xyz")])
    for ct in [
        f'Multipart/Form-Data; boundary="{BOUNDARY}"',
        f"multipart/form-data;boundary={BOUNDARY}; charset=utf-8",
    ]:
        form, _, _ = await run(ct, body, 7)
        assert form.file_bytes == 3


async def test_leading_crlf_and_epilogue_ignored_and_epilogue_not_read() -> None:
    body = b"\r\n" + hand_body([(['Content-Disposition: form-data; name="file"; filename="f"'], b"xyz")])

    async def stream() -> AsyncIterator[bytes]:
        yield body
        raise AssertionError("the epilogue must not be read")
        yield b""  # pragma: no cover

    opener = Opener()
    form = await parse_upload(CT, stream(), opener, max_file_bytes=100)
    assert bytes(opener.mem.data) == b"xyz"
    assert form.filename == "f"

    form, _, _ = await run(CT, body + b"epilogue\r\n--not-a-part\r\n", 5)
    assert form.file_bytes == 3


async def test_empty_chunks_are_skipped() -> None:
    ct, body = encode(files={"file": ("f", b"abc")})

    async def stream() -> AsyncIterator[bytes]:
        yield b""
        for i in range(0, len(body), 10):
            yield body[i : i + 10]
            yield b""

    opener = Opener()
    form = await parse_upload(ct, stream(), opener, max_file_bytes=100)
    assert form.file_bytes == 3


# --------------------------------------------------------------------------- limits


@chunk_sizes
async def test_file_cap_exceeded(size: int | None) -> None:
    cap = 100_000
    content = os.urandom(1_000_000 if size not in (1, 7) else 150_000)
    ct, body = encode(files={"file": ("big.bin", content)}, data={"purpose": "batch"})
    opener = Opener()
    with pytest.raises(PartTooLarge) as ei:
        await run(ct, body, size, opener, max_file_bytes=cap)
    assert ei.value.limit == cap
    written = len(opener.mem.data)
    assert written <= cap
    assert bytes(opener.mem.data) == content[:written]
    # with the whole body in one chunk the cap trips before the sink is ever opened
    assert opener.calls == (0 if size is None else 1)


@pytest.mark.parametrize("size", [1, 4096, 65536], ids=["1", "4096", "65536"])
async def test_file_cap_stops_reading_stream(size: int) -> None:
    cap = 50_000
    content = os.urandom(400_000)
    ct, body = encode(files={"file": ("big.bin", content)})
    opener = Opener()
    feeder = Feeder(body, size)
    with pytest.raises(PartTooLarge):
        await parse_upload(ct, aiter(feeder), opener, max_file_bytes=cap)
    overhead = len(body) - len(content)
    assert feeder.consumed <= cap + overhead + size
    assert len(opener.mem.data) <= cap


@chunk_sizes
async def test_file_exactly_at_cap_is_accepted(size: int | None) -> None:
    content = os.urandom(10_000)
    ct, body = encode(files={"file": ("f", content)})
    form, _, _ = await run(ct, body, size, max_file_bytes=len(content))
    assert form.file_bytes == len(content)
    with pytest.raises(PartTooLarge):
        await run(ct, body, size, max_file_bytes=len(content) - 1)


async def test_too_many_fields() -> None:
    data = {f"f{i}": "v" for i in range(40)}
    ct, body = encode(files={"file": ("f", b"x")}, data=data)
    with pytest.raises(MultipartError) as ei:
        await run(ct, body, 4096)
    assert "Too many" in ei.value.message
    # exactly max_fields parts (31 fields + the file) is fine
    data = {f"f{i}": "v" for i in range(31)}
    ct, body = encode(files={"file": ("f", b"x")}, data=data)
    form, _, _ = await run(ct, body, 4096)
    assert len(form.fields) == 31
    with pytest.raises(MultipartError):
        await run(ct, body, 4096, max_fields=31)


@chunk_sizes
async def test_field_too_large(size: int | None) -> None:
    ct, body = encode(files={"file": ("f", b"x")}, data={"purpose": "b" * 2000})
    with pytest.raises(MultipartError) as ei:
        await run(ct, body, size, max_field_bytes=1000)
    assert ei.value.param == "purpose"
    form, _, _ = await run(ct, body, size, max_field_bytes=2000)
    assert form.fields["purpose"] == "b" * 2000


async def test_field_invalid_utf8() -> None:
    body = hand_body(
        [
            (['Content-Disposition: form-data; name="purpose"'], b"bat\xffch"),
            (['Content-Disposition: form-data; name="file"; filename="f"'], b"x"),
        ]
    )
    with pytest.raises(MultipartError) as ei:
        await run(CT, body, 3)
    assert ei.value.param == "purpose"


async def test_field_utf8_decoded() -> None:
    body = hand_body([(['Content-Disposition: form-data; name="note"'], "héllo ✓".encode())])
    form, _, _ = await run(CT, body, 1)
    assert form.fields == {"note": "héllo ✓"}


# --------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    "ct",
    [
        None,
        "",
        "application/json",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/mixed; boundary=abc",
        "text/plain; boundary=abc",
        "multipart/form-data; boundary=" + "a" * 300,
        "multipart/form-data; boundary=ü",
        "multipart/form-data; boundary=€",
    ],
)
async def test_wrong_content_type(ct: str | None) -> None:
    _, body = encode(files={"file": ("f", b"x")})
    opener = Opener()
    with pytest.raises(MultipartError) as ei:
        await run(ct, body, None, opener)
    assert ei.value.message.startswith("Expected multipart/form-data")
    assert ei.value.param is None
    assert opener.calls == 0


@chunk_sizes
async def test_truncated_body(size: int | None) -> None:
    content = os.urandom(5000)
    ct, body = encode(files={"file": ("f", content)}, data={"purpose": "batch"})
    closing_len = len(body) - body.rindex(b"\r\n--")
    for cut in [0, 10, len(body) // 2, len(body) - closing_len, len(body) - 4, len(body) - 3]:
        with pytest.raises(MultipartError) as ei:
            await run(ct, body[:cut], size)
        assert "ended before" in ei.value.message
    # the trailing CRLF after the closing delimiter is optional
    form, _, _ = await run(ct, body[:-2], size)
    assert form.file_bytes == len(content)


@chunk_sizes
async def test_duplicate_file_part(size: int | None) -> None:
    ct, body = encode(files=[("file", ("a.jsonl", b"aaa")), ("file", ("b.jsonl", b"bbb"))])
    opener = Opener()
    with pytest.raises(MultipartError) as ei:
        await run(ct, body, size, opener)
    assert ei.value.param == "file"
    assert opener.calls <= 1


async def test_duplicate_field() -> None:
    body = hand_body(
        [
            (['Content-Disposition: form-data; name="purpose"'], b"batch"),
            (['Content-Disposition: form-data; name="purpose"'], b"fine-tune"),
        ]
    )
    with pytest.raises(MultipartError) as ei:
        await run(CT, body, None)
    assert ei.value.param == "purpose"


async def test_unexpected_file_part() -> None:
    ct, body = encode(files={"file": ("f", b"x"), "attachment": ("g", b"y")})
    with pytest.raises(MultipartError) as ei:
        await run(ct, body, None)
    assert ei.value.param == "attachment"


@pytest.mark.parametrize(
    "body",
    [
        b"garbage without any boundary",
        b"--other-boundary\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n--other-boundary--\r\n",
        hand_body([(["Content-Type: text/plain"], b"no disposition")]),
        hand_body([(["Content-Disposition: attachment; name=x"], b"v")]),
        hand_body([(["Content-Disposition: form-data; filename=x"], b"no name")]),
        hand_body([(["Bad Header Name: x"], b"v")]),
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=x\r\n".encode() + b"X-Pad: " + b"p" * 70_000,
    ],
    ids=[
        "garbage",
        "wrong-boundary",
        "no-disposition",
        "not-form-data",
        "no-name",
        "bad-header",
        "huge-header",
    ],
)
async def test_malformed(body: bytes) -> None:
    with pytest.raises(MultipartError):
        await run(CT, body, 4096)


async def test_sink_errors_propagate() -> None:
    class Boom:
        async def write(self, data: bytes) -> None:
            raise OSError("disk full")

    ct, body = encode(files={"file": ("f", b"x" * 1000)})
    with pytest.raises(OSError, match="disk full"):
        await run(ct, body, 100, Opener(Boom()))
