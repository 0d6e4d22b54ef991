"""`HTTPUpstream.stream` (the front door's path, on aiohttp) against the fake upstream on loopback: answers as they
arrive, the upstream's head kept, every failure an UpstreamError of the right kind, an early close that ends the
upstream's work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator

import pytest
import trustme

from batchyard.upstreams.base import UpstreamError
from batchyard.upstreams.http import HTTPUpstream
from tests.support.fake_upstream import FakeUpstream, build_response
from tests.support.processes import free_port

CHAT = "/v1/chat/completions"


def body(**extra: object) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-up") as up:
        yield up


@pytest.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[HTTPUpstream]:
    up = HTTPUpstream(fake.base_url, api_key="sk-up", max_body=64 * 1024)
    yield up
    await up.close()


async def test_events_arrive_while_the_upstream_is_still_sending(
    fake: FakeUpstream, client: HTTPUpstream
) -> None:
    answer = await client.stream(CHAT, body(stream=True, x_fake={"hold": True}), timeout=10)
    assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
    assert answer.headers["x-request-id"].startswith("req_")
    first = await anext(answer.chunks)
    assert first.startswith(b"data: ") and b'"content":"echo:"' in first
    assert fake.stats()["streams_open"] == 1  # still held by the fake
    fake.release()
    rest = b"".join([c async for c in answer.chunks])
    assert rest.endswith(b"data: [DONE]\n\n")
    # the fake counts the stream done after its last write, which the client may read first (another thread)
    for _ in range(100):
        if fake.stats()["streams_done"] == 1:
            break
        await asyncio.sleep(0.05)
    assert fake.stats()["streams_done"] == 1


async def test_a_whole_answer_comes_back_byte_for_byte(fake: FakeUpstream, client: HTTPUpstream) -> None:
    raw = body()
    answer = await client.stream(CHAT, raw, timeout=10)
    data = b"".join([c async for c in answer.chunks])
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert json.loads(data) == build_response(CHAT, json.loads(raw))
    assert fake.received()[-1] == raw


async def test_the_upstream_key_is_sent_and_a_redirect_is_an_answer(fake: FakeUpstream) -> None:
    keyless = HTTPUpstream(fake.base_url)
    try:
        refused = await keyless.stream(CHAT, body(), timeout=10)
        assert refused.status == 401
        await refused.aclose()
    finally:
        await keyless.close()
    keyed = HTTPUpstream(fake.base_url, api_key="sk-up")
    try:
        moved = await keyed.stream(CHAT, body(x_fake={"redirect": True}), timeout=10)
        assert moved.status == 307  # not followed
        await moved.aclose()
    finally:
        await keyed.close()


async def test_no_answer_is_a_connect_error_or_a_timeout(client: HTTPUpstream) -> None:
    nowhere = HTTPUpstream(f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(UpstreamError) as refused:
        await nowhere.stream(CHAT, body(), timeout=5)
    assert refused.value.kind == "connect"
    await nowhere.close()
    with pytest.raises(UpstreamError) as slow_head:
        await client.stream(CHAT, body(x_fake={"delay": 2}), timeout=0.3)
    assert slow_head.value.kind == "timeout"


async def test_a_stream_that_stalls_or_grows_too_large_raises_from_its_chunks(client: HTTPUpstream) -> None:
    stalled = await client.stream(CHAT, body(stream=True, x_fake={"stream_gap": 2}), timeout=0.5)
    with pytest.raises(UpstreamError) as gap:
        async for _ in stalled.chunks:
            pass
    assert gap.value.kind == "timeout"
    big = await client.stream(CHAT, body(x_fake={"big": 200_000}), timeout=10)
    with pytest.raises(UpstreamError) as large:
        async for _ in big.chunks:
            pass
    assert large.value.kind == "too_large"


async def test_closing_early_ends_the_upstreams_work(fake: FakeUpstream, client: HTTPUpstream) -> None:
    answer = await client.stream(CHAT, body(stream=True, x_fake={"hold": True}), timeout=10)
    await anext(answer.chunks)
    await answer.aclose()
    await answer.aclose()  # twice is harmless
    for _ in range(100):  # 5 s at most
        if fake.stats()["streams_cancelled"]:
            break
        await asyncio.sleep(0.05)
    assert fake.stats()["streams_cancelled"] == 1
    again = await client.stream(CHAT, body(), timeout=10)  # the session goes on
    assert again.status == 200
    await again.aclose()


async def test_https_uses_the_upstreams_trust() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 12\r\n\r\ndata: tls\n\n\n"
    )

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    up = HTTPUpstream(f"https://127.0.0.1:{port}/v1", ssl_context=trusting)
    untrusting = HTTPUpstream(f"https://127.0.0.1:{port}/v1")  # the system store does not know this CA
    try:
        got = await up.stream(CHAT, body(), timeout=5)
        assert got.status == 200 and b"".join([c async for c in got.chunks]) == b"data: tls\n\n\n"
        with pytest.raises(UpstreamError) as refused:
            await untrusting.stream(CHAT, body(), timeout=5)
        assert refused.value.kind == "connect" and "TLS" in refused.value.message
    finally:
        await up.close()
        await untrusting.close()
        server.close()
