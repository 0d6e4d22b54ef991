"""S3BlobStore's own behaviours against a real S3-compatible server (SeaweedFS `weed mini`): multipart uploads,
server-side copy, faults, configuration (test_blob_contract.py has what every BlobStore does, on S3 too)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import itertools
import random
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from batchyard.blobs import s3 as s3_module
from batchyard.blobs.s3 import MAX_PART, MIN_PART, S3BlobStore, SizeExceeded, copy_plan, parse_checksums
from batchyard.errors import BlobError, BlobNotFound, BlobStorageFull, BlobUnavailable
from tests.support.seaweed import ACCESS_KEY, REGION, SECRET_KEY, Seaweed

MiB = 1024 * 1024


def _store(seaweed: Seaweed, **kwargs: Any) -> S3BlobStore:
    # Every test gets its own prefix, so listing "the bucket" means listing what this test left behind.
    kwargs.setdefault("part_size", MIN_PART)
    return S3BlobStore(
        seaweed.bucket,
        f"t-{uuid.uuid4().hex[:12]}",
        endpoint=seaweed.endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        allow_http=True,
        **kwargs,
    )


@pytest.fixture
async def store(seaweed: Seaweed) -> AsyncIterator[S3BlobStore]:
    async with _store(seaweed) as s:
        yield s


def data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


async def listing(store: S3BlobStore) -> list[str]:
    """Every object under the store's prefix (keys without the prefix)."""
    s3 = await store.client()
    resp = await s3.list_objects_v2(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(o["Key"].removeprefix(store.prefix) for o in resp.get("Contents", []))


async def pending_uploads(store: S3BlobStore) -> list[str]:
    """Multipart uploads begun and neither completed nor aborted under the store's prefix."""
    s3 = await store.client()
    resp = await s3.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(u["Key"].removeprefix(store.prefix) for u in resp.get("Uploads", []) or [])


async def read_all(store: S3BlobStore, key: str, chunk_size: int = 1 << 20) -> bytes:
    return b"".join([c async for c in store.stream(key, chunk_size=chunk_size)])


async def put(store: S3BlobStore, key: str, body: bytes) -> None:
    w = await store.open_writer(key)
    await w.write(body)
    await w.commit()


# --- writer -------------------------------------------------------------------------------------------------


async def test_multipart_commit_is_atomic_and_reports_size_and_sha256(store: S3BlobStore) -> None:
    body = data(11 * MiB + 123)
    w = await store.open_writer("files/big")
    for i in range(0, len(body), 3 * MiB):
        await w.write(body[i : i + 3 * MiB])
    assert w.size == len(body)
    # Two parts are uploaded by now, yet nothing is visible under the key.
    assert await pending_uploads(store) == ["files/big"]
    assert not await store.exists("files/big")
    assert await listing(store) == []

    info = await w.commit()
    assert (info.key, info.size, info.sha256) == ("files/big", len(body), sha(body))
    assert await read_all(store, "files/big") == body
    assert await listing(store) == ["files/big"]
    assert await pending_uploads(store) == []


async def test_size_cap_raises_and_aborts_the_upload(store: S3BlobStore) -> None:
    w = await store.open_writer("files/capped", max_bytes=6 * MiB)
    await w.write(data(5 * MiB))  # one part uploaded
    assert await pending_uploads(store) == ["files/capped"]
    await w.write(data(MiB))  # exactly at the cap: allowed
    with pytest.raises(SizeExceeded) as caught:
        await w.write(b"x")
    assert isinstance(caught.value, BlobError) and caught.value.limit == 6 * MiB
    assert await pending_uploads(store) == []
    assert await listing(store) == []
    await w.abort()  # the caller's usual cleanup is harmless
    with pytest.raises(BlobError):
        await w.commit()


async def test_size_cap_on_a_small_blob(store: S3BlobStore) -> None:
    w = await store.open_writer("files/capped", max_bytes=10)
    with pytest.raises(SizeExceeded):
        await w.write(b"x" * 11)
    assert await listing(store) == []


# --- compose ------------------------------------------------------------------------------------------------


def _forbid(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    async def fail(*args: object, **kwargs: object) -> Any:
        raise AssertionError(f"{name} should not run here")

    monkeypatch.setattr(S3BlobStore, name, fail)


async def test_compose_small_parts_streams(store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "_copy_parts")
    parts = [b'{"a":1}\n', b"", b'{"b":2}\n' * 1000, data(MiB, seed=3)]
    for i, p in enumerate(parts):
        await put(store, f"parts/{i}", p)
    info = await store.compose("files/out", [f"parts/{i}" for i in range(len(parts))])
    whole = b"".join(parts)
    assert (info.key, info.size, info.sha256) == ("files/out", len(whole), sha(whole))
    assert await read_all(store, "files/out") == whole
    assert await pending_uploads(store) == []


async def test_compose_large_parts_copies_server_side(
    store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid(monkeypatch, "compose_streamed")
    parts = [data(5 * MiB, seed=1), b"", data(6 * MiB + 1, seed=2), b"tail\n"]
    for i, p in enumerate(parts):
        await put(store, f"parts/{i}", p)
    info = await store.compose("files/out", [f"parts/{i}" for i in range(len(parts))])
    whole = b"".join(parts)
    assert (info.size, info.sha256) == (len(whole), sha(whole))
    assert await read_all(store, "files/out") == whole
    assert await store.read_range("files/out", 5 * MiB - 2, 5 * MiB + 2) == whole[5 * MiB - 2 : 5 * MiB + 2]
    assert await pending_uploads(store) == []


async def test_compose_small_then_large_streams(store: S3BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid(monkeypatch, "_copy_parts")
    parts = [b"head\n", data(6 * MiB, seed=4)]
    for i, p in enumerate(parts):
        await put(store, f"parts/{i}", p)
    info = await store.compose("files/out", ["parts/0", "parts/1"])
    assert info.sha256 == sha(b"".join(parts))
    assert await read_all(store, "files/out") == b"".join(parts)


async def test_compose_aborts_when_a_source_changes_under_it(
    store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server-side copy is pinned to the ETags seen by HEAD: a changed source fails it and leaves nothing."""
    await put(store, "parts/0", data(5 * MiB))
    await put(store, "parts/1", b"tail")
    head = S3BlobStore._head

    async def stale_head(self: S3BlobStore, key: str) -> tuple[int, str]:
        size, etag = await head(self, key)
        return size, ('"0123456789abcdef0123456789abcdef"' if key == "parts/1" else etag)

    monkeypatch.setattr(S3BlobStore, "_head", stale_head)
    with pytest.raises(BlobError):
        await store.compose("files/out", ["parts/0", "parts/1"])
    assert await listing(store) == ["parts/0", "parts/1"]
    assert await pending_uploads(store) == []


async def test_compose_leaves_nothing_when_reading_fails_after_the_copy_completed(
    store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy may be complete (CompleteMultipartUpload answered) when the digest's read fails: the composed object
    is deleted, not left behind as it was when the failure cancelled the copy mid-request."""
    await put(store, "parts/0", data(5 * MiB))
    await put(store, "parts/1", b"tail")
    copied = asyncio.Event()
    copy_parts = S3BlobStore._copy_parts

    async def copy_then_signal(self: S3BlobStore, *args: Any) -> None:
        await copy_parts(self, *args)
        copied.set()

    async def failing_read(self: S3BlobStore, sources: Any, etags: Any) -> str:
        await copied.wait()
        raise BlobError("a source changed while it was read")

    monkeypatch.setattr(S3BlobStore, "_copy_parts", copy_then_signal)
    monkeypatch.setattr(S3BlobStore, "_sha256", failing_read)
    with pytest.raises(BlobError):
        await store.compose("files/out", ["parts/0", "parts/1"])
    assert await listing(store) == ["parts/0", "parts/1"]
    assert await pending_uploads(store) == []


def test_copy_plan() -> None:
    assert copy_plan([]) is None
    assert copy_plan([0, 0]) is None
    assert copy_plan([MIN_PART - 1, 10]) is None
    assert copy_plan([MIN_PART, 0, 10]) == [(0, None), (2, None)]
    assert copy_plan([10]) == [(0, None)]
    size = MAX_PART * 2 + 1
    plan = copy_plan([size, 1])
    assert plan is not None and [i for i, _ in plan] == [0, 0, 0, 1]
    spans = [span for _, span in plan[:3]]
    assert spans[0] is not None and spans[0][0] == 0 and spans[-1] is not None and spans[-1][1] == size
    assert all(a is not None and b is not None and a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert copy_plan([MIN_PART] * 10_001) is None


# --- delete, exists, keys -----------------------------------------------------------------------------------


def test_one_store_serves_several_event_loops(seaweed: Seaweed) -> None:
    """The API and the worker run on different loops (threads) and share one store."""
    store = _store(seaweed)
    errors: list[BaseException] = []

    async def use(name: str) -> None:
        try:
            await put(store, f"loops/{name}", name.encode())
            assert await read_all(store, f"loops/{name}") == name.encode()
        finally:
            await store.aclose()

    def run(name: str) -> None:
        try:
            asyncio.run(use(name))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    asyncio.run(use("main"))  # and a loop after those have closed

    async def check() -> list[str]:
        async with store:
            return await listing(store)

    assert asyncio.run(check()) == ["loops/main", "loops/t0", "loops/t1", "loops/t2"]


async def test_unreachable_endpoint_is_a_blob_error() -> None:
    s = S3BlobStore(
        "b", endpoint="http://127.0.0.1:1", allow_http=True, access_key="a", secret_key="b", max_attempts=1
    )
    async with s:
        with pytest.raises(BlobError) as caught:
            await s.exists("k")
    assert not isinstance(caught.value, BlobNotFound)


async def test_wrong_credentials_are_a_blob_error(seaweed: Seaweed) -> None:
    s = S3BlobStore(
        seaweed.bucket, endpoint=seaweed.endpoint, allow_http=True, access_key="no", secret_key="no"
    )
    async with s:
        with pytest.raises(BlobError, match="InvalidAccessKeyId"):
            await put(s, "k", b"v")


# --- checksums ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checksums", [True, "SHA256", "sha1"])
async def test_checksummed_uploads(seaweed: Seaweed, checksums: bool | str) -> None:
    async with _store(seaweed, checksums=checksums) as s:
        big = data(6 * MiB + 5)
        await put(s, "a", big)
        await put(s, "b", b"small")
        info = await s.compose("c", ["a", "b"])
        assert info.sha256 == sha(big + b"small")
        assert await read_all(s, "c") == big + b"small"


def test_parse_checksums() -> None:
    assert parse_checksums(None) is False
    assert parse_checksums("") is False
    assert parse_checksums("off") is False
    assert parse_checksums("0") is False
    assert parse_checksums("true") is True
    assert parse_checksums("sha256") == "SHA256"
    with pytest.raises(ValueError):
        S3BlobStore("b", checksums="md5")
    assert S3BlobStore("b", checksums=True).checksum_algorithm == "CRC32"
    assert S3BlobStore("b").checksum_algorithm is None
    if importlib.util.find_spec("awscrt") is None:
        with pytest.raises(ValueError, match=r"botocore\[crt\]"):
            S3BlobStore("b", checksums="crc32c")


# --- from_url -----------------------------------------------------------------------------------------------


def test_from_url_reads_the_standard_variables() -> None:
    env = {
        "AWS_ENDPOINT_URL": "https://generic.example",
        "AWS_ENDPOINT_URL_S3": "https://s3.example",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "BATCHYARD_S3_CHECKSUMS": "crc32",
    }
    s = S3BlobStore.from_url("s3://my-bucket/some/prefix/", env=env)
    assert (s.bucket, s.prefix, s.endpoint, s.region) == (
        "my-bucket",
        "some/prefix/",
        "https://s3.example",
        "eu-west-1",
    )
    assert s.checksum_algorithm == "CRC32"
    assert s.object_key("files/x") == "some/prefix/files/x"

    s = S3BlobStore.from_url("s3://b", env={"AWS_REGION": "us-west-2", "AWS_DEFAULT_REGION": "eu-west-1"})
    assert (s.bucket, s.prefix, s.endpoint, s.region, s.checksum_algorithm) == (
        "b",
        "",
        None,
        "us-west-2",
        None,
    )
    assert s.object_key("files/x") == "files/x"

    s = S3BlobStore.from_url("s3://b/p", env={"AWS_ENDPOINT_URL": "https://generic.example"})
    assert s.endpoint == "https://generic.example"


def test_from_url_refuses_plain_http_unless_allowed() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    with pytest.raises(ValueError, match="AWS_ALLOW_HTTP"):
        S3BlobStore.from_url("s3://b", env=env)
    assert (
        S3BlobStore.from_url("s3://b", env={**env, "AWS_ALLOW_HTTP": "true"}).endpoint
        == env["AWS_ENDPOINT_URL"]
    )


@pytest.mark.parametrize(
    "url", ["file:///tmp/x", "s3://", "s3:///prefix", "b/prefix", "s3://b?x=1", "s3://u@b/p", "s3://b:9000/p"]
)
def test_from_url_rejects_other_urls(url: str) -> None:
    with pytest.raises(ValueError):
        S3BlobStore.from_url(url, env={})


async def test_from_url_against_the_server(seaweed: Seaweed) -> None:
    prefix = f"t-{uuid.uuid4().hex[:12]}"
    async with S3BlobStore.from_url(f"s3://{seaweed.bucket}/{prefix}", env=seaweed.env()) as s:
        await put(s, "files/x", b"via env")
        assert await s.read_range("files/x", 4, 7) == b"env"
    async with _store(seaweed) as other:
        s3 = await other.client()
        head = await s3.head_object(Bucket=seaweed.bucket, Key=f"{prefix}/files/x")
        assert head["ContentLength"] == 7


# --- faults: an outage is BlobUnavailable, quickly; nothing half-written is visible ------------------------


class Misbehaving:
    """An HTTP server on a loopback port that answers every request with `answer(method, path)` (raw bytes, sent
    as is, then the connection closed): the S3 server that fails in the ways a real one does."""

    def __init__(self, answer: Callable[[str, str], bytes]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Misbehaving:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, path = head.split(" ", 2)[:2]
            length = next(
                (
                    int(h.split(":", 1)[1])
                    for h in head.split("\r\n")
                    if h.lower().startswith("content-length:")
                ),
                0,
            )
            if "expect: 100-continue" not in head.lower():  # else the client waits for us before sending it
                await reader.readexactly(length)
            self.requests.append((method, path))
            writer.write(self.answer(method, path))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _xml_error(status: int, code: str) -> bytes:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _faulty_store(endpoint: str, **kwargs: Any) -> S3BlobStore:
    return S3BlobStore("b", endpoint=endpoint, allow_http=True, access_key="a", secret_key="b", **kwargs)


async def test_nothing_listening_is_unavailable_within_seconds() -> None:
    with socket.socket() as probe:  # a loopback port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with _faulty_store(f"http://127.0.0.1:{port}") as s:  # the default timeouts and retries
        started = time.monotonic()
        with pytest.raises(BlobUnavailable):
            await put(s, "k", b"v")
        assert time.monotonic() - started < 8  # 3 attempts, at most 1 s + 2 s of backoff between them
        with pytest.raises(BlobUnavailable):
            await read_all(s, "k")
        with pytest.raises(BlobUnavailable):
            [k async for k in s.list_keys("")]


async def test_default_timeouts_and_retries_are_bounded() -> None:
    s = _faulty_store("http://127.0.0.1:1")
    async with s:
        config = (await s.client()).meta.config
    assert (config.connect_timeout, config.read_timeout) == (5, 60)
    assert config.retries == {"mode": "standard", "total_max_attempts": 3}


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (503, "SlowDown", BlobUnavailable),
        (500, "InternalError", BlobUnavailable),
        (502, "BadGateway", BlobUnavailable),
        (507, "XMinioStorageFull", BlobStorageFull),
        (403, "AccessDenied", BlobError),
    ],
)
async def test_server_errors_are_mapped(status: int, code: str, error: type[BlobError]) -> None:
    async with (
        Misbehaving(lambda _m, _p: _xml_error(status, code)) as server,
        _faulty_store(server.endpoint, max_attempts=1) as s,
    ):
        for call in (put(s, "k", b"v"), s.read_range("k", 0, 5), s.delete("k")):
            with pytest.raises(error) as caught:
                await call
            assert type(caught.value) is error


async def test_connection_reset_is_unavailable() -> None:
    # accepts, reads the request, closes without a word
    async with Misbehaving(lambda _m, _p: b"") as server, _faulty_store(server.endpoint, max_attempts=2) as s:
        with pytest.raises(BlobUnavailable):
            await put(s, "k", b"v")
        # botocore tried twice, then gave up; aiohttp resends once on a connection closed before an answer
        assert 2 <= len(server.requests) <= 4


async def test_a_body_cut_short_while_streaming_is_unavailable() -> None:
    def answer(method: str, _path: str) -> bytes:
        # A GET whose body stops after 10 of its 1,000,000 bytes: the failure comes inside stream()'s iteration.
        return b'HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\nETag: "e"\r\n\r\n' + b"x" * 10

    async with Misbehaving(answer) as server, _faulty_store(server.endpoint, max_attempts=1) as s:
        with pytest.raises(BlobUnavailable):
            await read_all(s, "k", chunk_size=100)


async def test_a_failed_multipart_writer_leaves_nothing_visible(store: S3BlobStore, seaweed: Seaweed) -> None:
    """A part upload fails mid-blob (the server went away): the writer aborts, nothing is listed under the key."""
    w = await store.open_writer("parts/b/000001.1.out")
    await w.write(data(MIN_PART + 1))  # one part is uploaded
    assert await pending_uploads(store) == ["parts/b/000001.1.out"]
    real = await store.client()

    async def refused(**kwargs: Any) -> Any:
        raise EndpointConnectionError(endpoint_url=seaweed.endpoint)

    real.upload_part, saved = refused, real.upload_part
    try:
        with pytest.raises(BlobUnavailable):
            await w.write(data(MIN_PART + 1, 1))
    finally:
        real.upload_part = saved
    assert await listing(store) == []
    assert await pending_uploads(store) == []
    with pytest.raises(BlobError):
        await w.commit()


# --- listing, abandoned writes ------------------------------------------------------------------------------


async def test_list_keys_pages_through_everything(
    store: S3BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_module, "LIST_PAGE", 2)
    keys = ["parts/b1/0.1.out", "parts/b1/0.1.err", "parts/b2/0.1.out", "files/f1", "filesx"]
    before = time.time()
    for key in keys:
        await put(store, key, b"x")
    pending = await store.open_writer("parts/b1/1.1.out")
    await pending.write(data(MIN_PART + 1))  # an upload begun, not completed: never listed

    async def keys_under(prefix: str) -> list[str]:
        return sorted([k async for k, _ in store.list_keys(prefix)])

    assert await keys_under("parts/") == ["parts/b1/0.1.err", "parts/b1/0.1.out", "parts/b2/0.1.out"]
    assert await keys_under("files") == ["files/f1", "filesx"]
    assert await keys_under("") == sorted(keys)
    assert await keys_under("none/") == []
    assert all(before - 60 < m < time.time() + 60 for _, m in [x async for x in store.list_keys("")])
    await pending.abort()
