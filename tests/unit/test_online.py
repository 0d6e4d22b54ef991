"""The front door in process (api/online.py over scripted upstreams, through httpx's ASGI transport): the online
gate is held around every upstream call, a stream's included, to its last chunk; a connect failure moves to the
next member once, an ejected member comes last, a timeout is not retried, and a stream that breaks off ends with an
`error` event. What the real server and the official SDK see is in tests/e2e/test_online.py."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from batchyard.api.app import create_app
from batchyard.api.services import Services
from batchyard.blobs.memory import MemoryBlobStore
from batchyard.config import Settings
from batchyard.store.memory import MemoryStore
from batchyard.upstreams.base import Upstream, UpstreamError, UpstreamResponse, UpstreamStream
from batchyard.upstreams.limiter import Limiter
from batchyard.upstreams.online import OnlineGate
from batchyard.upstreams.pool import Member
from batchyard.upstreams.router import Router

Events = list[tuple[str, str]]
CHAT = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[],"stream":true}'


class Recording(OnlineGate):
    def __init__(self, events: Events) -> None:
        self.events = events

    @contextlib.asynccontextmanager
    async def hold(self, member: Member) -> AsyncIterator[None]:
        self.events.append(("enter", member.name))
        try:
            yield
        finally:
            self.events.append(("exit", member.name))


class Scripted(Upstream):
    def __init__(self, name: str, events: Events, chunks: list[bytes], *, fail: str | None = None) -> None:
        self.name = name
        self.events = events
        self.chunks = chunks
        self.fail = fail  # an UpstreamError kind: raised before the head, or mid-stream after the chunks
        self.fail_mid_stream = False
        self.headers = {"content-type": "text/event-stream"}

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        raise AssertionError("online requests use stream()")

    async def stream(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamStream:
        self.events.append(("sent", self.name))
        if self.fail and not self.fail_mid_stream:
            raise UpstreamError(self.fail, f"scripted {self.fail}")

        async def chunks() -> AsyncIterator[bytes]:
            for c in self.chunks:
                self.events.append(("chunk", c.decode()))
                yield c
            if self.fail:
                raise UpstreamError(self.fail, f"scripted {self.fail}")

        return UpstreamStream(200, self.headers, chunks())


@contextlib.asynccontextmanager
async def serving(*upstreams: Scripted, events: Events) -> AsyncIterator[httpx.AsyncClient]:
    async with serving_members(*[Member(u, Limiter(4)) for u in upstreams], events=events) as http:
        yield http


@contextlib.asynccontextmanager
async def serving_members(*members: Member, events: Events) -> AsyncIterator[httpx.AsyncClient]:
    store = MemoryStore()
    await store.open()
    svc = Services(
        store, MemoryBlobStore(), Router([("m", m) for m in members]), Settings(), online=Recording(events)
    )
    transport = httpx.ASGITransport(app=create_app(svc))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as http:
            yield http
    finally:
        await store.close()


@pytest.fixture
def events() -> Iterator[Events]:
    yield []


async def test_the_gate_is_held_to_the_last_chunk_of_a_stream(events: Events) -> None:
    up = Scripted("a", events, [b"data: 1\n\n", b"data: 2\n\n"])
    async with serving(up, events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.status_code == 200 and r.content == b"data: 1\n\ndata: 2\n\n"
    assert events == [
        ("enter", "a"),
        ("sent", "a"),
        ("chunk", "data: 1\n\n"),
        ("chunk", "data: 2\n\n"),
        ("exit", "a"),
    ]


async def test_a_connect_failure_moves_to_the_next_member_once(events: Events) -> None:
    down, ok = Scripted("down", events, [], fail="connect"), Scripted("ok", events, [b"data: x\n\n"])
    async with serving(down, ok, events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.status_code == 200
    assert [e for e in events if e[0] != "chunk"] == [
        ("enter", "down"),
        ("sent", "down"),
        ("exit", "down"),
        ("enter", "ok"),
        ("sent", "ok"),
        ("exit", "ok"),
    ]
    events.clear()
    twice = Scripted("down2", events, [], fail="connect")
    async with serving(down, twice, events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_connect"
    assert [e for e in events if e[0] == "sent"] == [
        ("sent", "down"),
        ("sent", "down2"),
    ]  # once more, no more


async def test_an_ejected_member_comes_last(events: Events) -> None:
    ejected, healthy = (
        Scripted("ejected", events, [b"data: e\n\n"]),
        Scripted("healthy", events, [b"data: h\n\n"]),
    )
    first = Member(ejected, Limiter(4))
    first.health.ejections = 1
    first.health.ejected_until = time.monotonic() + 60
    async with serving_members(first, Member(healthy, Limiter(4)), events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.content == b"data: h\n\n"
    assert ("sent", "ejected") not in events


async def test_a_timeout_is_not_retried_and_answers_504(events: Events) -> None:
    slow, other = Scripted("slow", events, [], fail="timeout"), Scripted("other", events, [b"data: o\n\n"])
    async with serving(slow, other, events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    assert ("sent", "other") not in events
    assert events[-1] == ("exit", "slow")


async def test_a_stream_that_breaks_off_ends_with_an_error_event(events: Events) -> None:
    up = Scripted("a", events, [b"data: 1\n\n", b"data: half"], fail="connect")
    up.fail_mid_stream = True
    async with serving(up, events=events) as http:
        r = await http.post(CHAT, content=BODY)
    assert r.status_code == 200  # the head was sent before the break
    head, _, last = r.content.rpartition(b"event: error\ndata: ")
    assert head == b"data: 1\n\n"  # the half-written event is not passed on (the SDK would fail to parse it)
    assert json.loads(last)["error"]["code"] == "upstream_connect"
    assert events[-1] == ("exit", "a")


async def test_odd_upstream_headers_are_dropped_not_a_500(events: Events) -> None:
    up = Scripted("a", events, [b"{}"])
    up.headers = {
        "content-type": "application/json" + "x" * 2000,
        "x-request-id": "req_\u00e9\udcff",
        "retry-after": "3",
    }
    async with serving(up, events=events) as http:
        r = await http.post(CHAT, content=b'{"model":"m"}')
    assert r.status_code == 200 and r.content == b"{}"
    assert r.headers["content-type"] == "application/json"  # the default
    assert r.headers["retry-after"] == "3"
    assert "x-request-id" not in r.headers  # dropped (no access-log middleware in process to add ours)
