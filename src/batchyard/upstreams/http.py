"""An OpenAI-compatible HTTP upstream on aiohttp: redirects off, body size cap, overall deadline per attempt."""

from __future__ import annotations

import asyncio

import aiohttp

from batchyard.ids import request_id
from batchyard.upstreams.base import Upstream, UpstreamError, UpstreamResponse

DEFAULT_MAX_BODY = 64 * 1024 * 1024
# The only response headers batchyard reads (names as sent lower-case; aiohttp's lookup is case-insensitive).
_KEPT_HEADERS = ("x-request-id", "retry-after", "retry-after-ms")


class HTTPUpstream(Upstream):
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        name: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        max_connections: int = 0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self._api_key = api_key
        self._max_body = max_body
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
            headers = {"Content-Type": "application/json", "User-Agent": "batchyard"}
            if self._api_key:
                headers["Authorization"] = f"Bearer {self._api_key}"
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=None)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, endpoint: str) -> str:
        path = endpoint[3:] if endpoint.startswith("/v1/") else endpoint
        return self.base_url + path

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                raise UpstreamError("too_large", f"upstream response exceeded {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        if self._session is None:
            await self.start()
        assert self._session is not None
        try:
            async with asyncio.timeout(timeout):
                async with self._session.post(
                    self.url_for(endpoint), data=body, allow_redirects=False
                ) as resp:
                    length = resp.content_length
                    if length is not None and length <= self._max_body:
                        data = await resp.read()
                    else:
                        data = await self._read_capped(resp)
                    h = resp.headers
                    headers = {k: v for k in _KEPT_HEADERS if (v := h.get(k)) is not None}
                    rid = headers.get("x-request-id") or request_id()
                    return UpstreamResponse(resp.status, headers, data, rid)
        except TimeoutError as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout:g}s") from e
        except aiohttp.ClientError as e:
            raise UpstreamError("connect", f"upstream connection failed: {type(e).__name__}") from e
        except OSError as e:
            raise UpstreamError(
                "connect", f"upstream connection failed: {e.strerror or type(e).__name__}"
            ) from e
