"""The lean HTTP/1.1 client of HTTPUpstream against real loopback servers that answer in every framing HTTP allows,
misbehave, or close connections under it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
import trustme

from batchyard.upstreams.base import UpstreamError
from batchyard.upstreams.http import HTTPUpstream

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A TCP server whose handler answers each request on a connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                await self.handler(reader, writer, n)
                n += 1
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> Scripted:
        s = Scripted(handler)
        s.server = await asyncio.start_server(s._serve, "127.0.0.1", 0, ssl=ssl_ctx)
        started.append(s)
        return s

    yield start
    for s in started:
        assert s.server is not None
        s.server.close()


def ok(body: bytes = b'{"ok": true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


async def call(
    up: HTTPUpstream, body: bytes = b'{"q": 1}', timeout: float = 5.0
) -> tuple[int, bytes, dict[str, str]]:
    r = await up.call("/v1/chat/completions", body, timeout=timeout)
    return r.status, r.body, r.headers


async def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok(b'{"n": %d}' % n, b"X-Request-Id: req-%d\r\n" % n))

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1", api_key="sk-up")
    for i in range(5):
        status, body, headers = await call(up, b'{"i": %d}' % i)
        assert (status, orjson.loads(body), headers["x-request-id"]) == (200, {"n": i}, f"req-{i}")
    await up.close()
    assert s.connections == 1
    head, _, body = s.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{s.port}".encode() in lines
    assert b"Authorization: Bearer sk-up" in lines and b"Content-Type: application/json" in lines
    assert body == b'{"i": 0}'


async def test_concurrent_requests_open_one_connection_each_then_reuse_them(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await asyncio.sleep(0.05)
        w.write(ok())

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    for _ in range(3):
        results = await asyncio.gather(*(call(up) for _ in range(8)))
        assert all(st == 200 for st, _, _ in results)
    await up.close()
    assert s.connections == 8


async def test_chunked_body_is_reassembled(serve) -> None:  # type: ignore[no-untyped-def]
    payload = orjson.dumps({"text": "x" * 5000})

    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(payload), 1000):
            part = payload[i : i + 1000]
            w.write(b"%x\r\n%s\r\n" % (len(part), part))
            await w.drain()
        w.write(b"0\r\n\r\n")

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    assert (await call(up))[:2] == (200, payload)
    assert (await call(up))[:2] == (200, payload)
    assert s.connections == 1


async def test_body_delimited_by_the_end_of_the_connection(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b'HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{"old": "school"}')
        await w.drain()
        w.close()

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    for _ in range(2):  # the closed connection is not reused
        assert (await call(up))[:2] == (200, b'{"old": "school"}')
    assert s.connections == 2


async def test_connection_close_answer_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok(extra=b"Connection: close\r\n"))
        await w.drain()
        w.close()

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    for _ in range(3):
        assert (await call(up))[0] == 200
    assert s.connections == 3


async def test_server_closing_an_idle_connection_is_survived(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok())
        await w.drain()
        w.close()  # keep-alive announced (HTTP/1.1, no Connection: close), then closed anyway: an idle timeout

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    assert (await call(up))[0] == 200
    await asyncio.sleep(0.1)
    assert (await call(up))[0] == 200
    assert s.connections == 2


async def test_stale_pooled_connection_is_retried_once_on_a_new_one(serve) -> None:  # type: ignore[no-untyped-def]
    """The close races the next request: the request is written to a connection the server already dropped."""

    async def h(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok())
        await w.drain()
        if n == 0 and s.connections == 1:
            w.transport.abort()  # drops the connection without reading the next request

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    assert (await call(up))[0] == 200
    conn = up._idle[0]
    conn.closed = False  # as if the close had not reached us yet
    assert (await call(up))[0] == 200
    assert s.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        ok(b"x" * 2000),  # Content-Length above the cap
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"400\r\n"
        + b"x" * 1024
        + b"\r\n"
        + b"400\r\n"
        + b"x" * 1024
        + b"\r\n0\r\n\r\n",  # chunked, over the cap only in total
        b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 2000,  # delimited by the end of the connection
    ],
)
async def test_body_over_the_cap_is_too_large(serve, answer: bytes) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(answer)
        await w.drain()
        w.close()

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1", max_body=1500)
    with pytest.raises(UpstreamError) as e:
        await call(up)
    assert e.value.kind == "too_large"


async def test_reset_mid_body_and_malformed_answers_are_connection_errors(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if s.connections == 1:
            w.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"partial')
            await w.drain()
            w.transport.abort()
        elif s.connections == 2:
            w.write(b"SMTP ready\r\n\r\n")
        else:
            w.write(b'HTTP/1.0 200 OK\r\n\r\n{"cut')
            await w.drain()
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()  # a reset (RST), not a clean end: the close-delimited body is not complete

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    for _ in range(3):
        with pytest.raises(UpstreamError) as e:
            await call(up)
        assert e.value.kind == "connect"


async def test_redirect_is_an_answer_not_followed(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n"
        )

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    assert (await call(up))[:2] == (307, b"")
    assert len(s.requests) == 1


async def test_deadline_aborts_the_connection_and_the_next_request_works(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        if s.connections == 1:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{")  # then drips nothing more
            await w.drain()
            await asyncio.sleep(5)
        w.write(ok())

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    with pytest.raises(UpstreamError) as e:
        await call(up, timeout=0.3)
    assert e.value.kind == "timeout"
    assert (await call(up))[0] == 200
    assert s.connections == 2  # the timed-out connection was dropped, not reused


async def test_refused_connection_is_a_connection_error() -> None:
    up = HTTPUpstream("http://127.0.0.1:9/v1")
    with pytest.raises(UpstreamError) as e:
        await call(up)
    assert e.value.kind == "connect"


@pytest.fixture
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority (no system store knows it)."""
    return trustme.CA()


async def test_https_with_verification(serve, tls_ca: trustme.CA) -> None:  # type: ignore[no-untyped-def]
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)

    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(ok(b'{"tls": true}'))

    s = await serve(h, server_ctx)
    trusting = ssl.create_default_context()
    tls_ca.configure_trust(trusting)
    up = HTTPUpstream(f"https://127.0.0.1:{s.port}/v1", ssl_context=trusting)
    assert (await call(up))[:2] == (200, b'{"tls": true}')
    assert (await call(up))[:2] == (200, b'{"tls": true}')
    assert s.connections == 1
    await up.close()
    untrusting = HTTPUpstream(f"https://127.0.0.1:{s.port}/v1")  # the system store does not know this cert
    with pytest.raises(UpstreamError) as e:
        await call(untrusting)
    assert e.value.kind == "connect" and "TLS" in e.value.message


def test_header_injection_through_the_api_key_is_refused() -> None:
    with pytest.raises(ValueError):
        HTTPUpstream("http://127.0.0.1:1/v1", api_key="sk\r\nX-Evil: 1")


async def test_interim_100_continue_and_103_are_skipped_and_the_connection_reused(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
        w.write(ok(b'{"n": %d}' % n))

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    for i in range(3):
        status, body, _ = await call(up)
        assert (status, orjson.loads(body)) == (200, {"n": i})
    await up.close()
    assert s.connections == 1


async def test_an_endless_response_head_is_cut_off(serve) -> None:  # type: ignore[no-untyped-def]
    async def h(_r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(2000):  # 2000 headers of 1 KiB: a head of 2 MiB
            w.write(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1024))
            await w.drain()

    s = await serve(h)
    up = HTTPUpstream(f"http://127.0.0.1:{s.port}/v1")
    with pytest.raises(UpstreamError) as e:
        await call(up)
    assert e.value.kind == "too_large" and "head" in e.value.message
    await up.close()
