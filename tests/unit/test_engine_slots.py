"""An adaptive limit is held at or below the slots an engine reports (llama.cpp's `GET /props`), asked at start
over a real loopback HTTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from batchyard.config import Settings
from batchyard.upstreams.factory import build_router
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.limiter import AdaptiveLimiter, Limiter, Signal
from batchyard.upstreams.router import Router


async def serve(props: Any, status: int = 200) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        if props is None:
            return web.Response(status=404)
        return web.json_response(props, status=status)

    app = web.Application()
    app.router.add_get("/props", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.fixture
async def llamacpp() -> AsyncIterator[str]:
    async for url in serve({"total_slots": 4, "default_generation_settings": {}}):
        yield url


async def start(url: str, limiter: Limiter) -> Limiter:
    router = Router([(None, HTTPUpstream(url))], limiter=lambda: limiter)
    await router.start()
    await router.aclose()
    return limiter


async def test_an_engine_with_4_slots_holds_the_adaptive_limit_at_4(llamacpp: str) -> None:
    lim = await start(llamacpp, AdaptiveLimiter(initial=64, max_limit=1024))
    assert isinstance(lim, AdaptiveLimiter)
    assert lim.max_limit == 4 and lim.limit == 4
    for _ in range(200):  # growth stops at the slots
        lim.observe(0.01, Signal.OK)
    assert lim.limit <= 4


async def test_a_lower_max_concurrency_stays_and_a_fixed_limit_is_left_alone(llamacpp: str) -> None:
    lim = await start(llamacpp, AdaptiveLimiter(initial=2, max_limit=3))
    assert isinstance(lim, AdaptiveLimiter) and (lim.max_limit, lim.limit) == (3, 2)
    fixed = await start(llamacpp, Limiter(32))
    assert fixed.limit == 32  # --concurrency N is the operator's word


@pytest.mark.parametrize("props", [None, {"total_slots": "4"}, {"total_slots": 0}, [1, 2], {"other": 1}])
async def test_an_engine_that_does_not_say_changes_nothing(props: Any) -> None:
    async for url in serve(props):
        lim = await start(url, AdaptiveLimiter(initial=16, max_limit=1024))
        assert isinstance(lim, AdaptiveLimiter) and (lim.max_limit, lim.limit) == (1024, 16)


async def test_an_engine_that_is_down_changes_nothing() -> None:
    lim = await start("http://127.0.0.1:9/v1", AdaptiveLimiter(initial=16, max_limit=1024))
    assert isinstance(lim, AdaptiveLimiter) and lim.max_limit == 1024


async def test_llamacpp_batch_requests_are_not_cut_for_online_ones(llamacpp: str) -> None:
    """llama.cpp's server finishes a non-streaming request whose client went away (docs/priority.md): cutting one
    would free no engine slot, so an upstream that answers /props is not preemptible; one that does not stays so."""
    up = HTTPUpstream(llamacpp)
    assert up.preemptible
    router = Router([(None, up)], limiter=lambda: Limiter(8))
    await router.start()
    await router.aclose()
    assert not up.preemptible
    async for other in serve(None):
        plain = HTTPUpstream(other)
        router = Router([(None, plain)], limiter=lambda: Limiter(8))
        await router.start()
        await router.aclose()
        assert plain.preemptible


CHAT_LINE = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    ("mode", "llama", "streams"),
    [
        ("auto", True, True),
        ("auto", False, False),
        ("off", True, False),
        ("on", False, True),
        ("on", True, True),
    ],
)
async def test_batch_lines_go_as_streams_to_llamacpp_by_default(
    mode: Any, llama: bool, streams: bool
) -> None:
    """`--stream-batch-lines auto`: to an upstream that answers /props (llama.cpp stops a stream whose client left,
    not a plain request); `on`: to every upstream; `off`: to none."""
    async for url in serve({"total_slots": 4} if llama else None):
        up = HTTPUpstream(url, stream_lines=mode)
        router = Router([(None, up)], limiter=lambda: Limiter(8))
        await router.start()
        await router.aclose()
        assert up.streams("/v1/chat/completions", CHAT_LINE) is streams
        assert not up.streams("/v1/embeddings", {"model": "m", "input": "Hi"})


@pytest.mark.parametrize(("priority", "cut"), [("pause", True), ("slots", False), ("off", False)])
def test_online_requests_cut_streamed_lines_under_pause_only(priority: Any, cut: bool) -> None:
    """Under `slots` a cut on a CPU engine wastes the line's work and the online request still shares the cores
    with the other lines (docs/priority.md, measured); a cancel cuts them in any mode."""
    router = build_router(
        Settings(upstreams=[(None, "http://127.0.0.1:9/v1")], online_priority=priority, embedded=False)
    )
    (member,) = router.members
    assert member.upstream.preemptible_streams is cut
