"""The upstream HTTP client alone: CPU per request of batchyard's HTTPUpstream against a bare aiohttp session and a
raw httptools protocol (the floor), all POSTing the same 4 KB chat body to the same zero-cost nginx, 64 requests in
flight, in one process (uvloop).

    python bench/http_client.py [--requests 30000] [--concurrency 64]

Needs Debian's nginx (`apt-get install -y nginx-light`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import Nginx, workdir

from batchyard.upstreams.http import HTTPUpstream

BODY = orjson.dumps(
    {
        "model": "bench-model",
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 148}],
    }
)


async def drive(send: Callable[[], Awaitable[int]], n: int, concurrency: int) -> tuple[float, float]:
    left = n

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            assert await send() == 200

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def run_aiohttp(base_url: str, n: int, c: int) -> tuple[float, float]:
    url = base_url + "/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def send() -> int:
            async with s.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                return r.status

        return await drive(send, n, c)


async def run_raw(base_url: str, n: int, c: int) -> tuple[float, float]:
    """The floor: one asyncio protocol a connection writing a prebuilt request and feeding llhttp (no deadline, no
    pool, no headers read, no size cap, no error handling)."""
    u = urlsplit(base_url)
    head = (
        f"POST {u.path}/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.waiter: asyncio.Future[int] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            assert self.waiter is not None
            self.waiter.set_result(int(self.parser.get_status_code()))

    host, port = u.hostname or "127.0.0.1", u.port or 80
    idle = [(await loop.create_connection(Conn, host, port))[1] for _ in range(c)]

    async def send() -> int:
        conn = idle.pop()
        conn.waiter = loop.create_future()
        conn.transport.writelines((head, BODY))
        status = await conn.waiter
        idle.append(conn)
        return status

    try:
        return await drive(send, n, c)
    finally:
        for conn in idle:
            conn.transport.close()


async def run_batchyard(base_url: str, n: int, c: int) -> tuple[float, float]:
    up = HTTPUpstream(base_url)

    async def send() -> int:
        return (await up.call("/v1/chat/completions", BODY, timeout=30)).status

    try:
        return await drive(send, n, c)
    finally:
        await up.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=30_000)
    ap.add_argument("--concurrency", type=int, default=64)
    a = ap.parse_args()
    with Nginx(workdir()) as ng:
        results = {}
        runs = (("aiohttp", run_aiohttp), ("batchyard", run_batchyard), ("raw", run_raw))
        for name, fn in runs * 2:  # twice, interleaved
            wall, cpu = uvloop.run(fn(ng.base_url, a.requests, a.concurrency))
            print(f"{name:10s}: {a.requests / wall:8.0f} req/s, {cpu / a.requests * 1e6:6.1f} us CPU/request")
            results[name] = min(results.get(name, 1e9), cpu)
    print(f"CPU per request, aiohttp / batchyard: {results['aiohttp'] / results['batchyard']:.2f}x")
    print(
        f"CPU per request, batchyard / raw httptools protocol: {results['batchyard'] / results['raw']:.2f}x"
    )


if __name__ == "__main__":
    main()
