"""An OpenAI-compatible HTTP upstream: a lean HTTP/1.1 keep-alive client on asyncio protocols and httptools.

Why not aiohttp: against a fast upstream the client's per-request work is the worker's bottleneck, and aiohttp's
request machinery (sessions, request/response objects, payloads, stream readers, tracing hooks) costs ~68 us of CPU
per request here; a protocol that writes one buffer and feeds the answer to llhttp costs ~19 us
(`python bench/http_client.py`, figures in docs/performance.md). batchyard needs little of HTTP: one POST with a JSON body, three response headers, the status
and the body. What it does need is kept:

- keep-alive connections, pooled per upstream (one request at a time on each; as many as requests in flight);
- bodies framed by Content-Length, chunked encoding or the end of the connection; a size cap (`too_large`);
- redirects are never followed (a 3xx is an answer like any other); interim 1xx answers (100 Continue) are
  skipped; the head of an answer is capped (MAX_HEAD_BYTES) like its body;
- TLS for https:// upstreams (system trust store, SNI);
- the caller's overall deadline: a request cancelled mid-way closes its connection, never returns it to the pool;
- a pooled connection that the server closed while idle is detected, and a request that finds it dead before any
  byte of an answer came back is sent once more on a new connection (as urllib3 and httpx do).

Online requests (the front door, `stream`) go through aiohttp instead, on a session of this upstream opened on
first use: they are few next to batch lines, and their answers are passed through as they arrive (server-sent
events), which the lean path above does not do. Same base URL, key and TLS; redirects off; no compression asked.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import httptools
import orjson

from batchyard.ids import request_id
from batchyard.upstreams import streamed
from batchyard.upstreams.base import Upstream, UpstreamError, UpstreamResponse, UpstreamStream

StreamLines = Literal["auto", "on", "off"]
DEFAULT_MAX_BODY = 64 * 1024 * 1024
MAX_HEAD_BYTES = 256 * 1024  # status line and headers of one answer (including interim 1xx answers)
# The only response headers batchyard reads.
_KEPT_HEADERS = frozenset((b"x-request-id", b"retry-after", b"retry-after-ms"))
# The response headers an online answer passes on to its client.
STREAM_HEADERS = ("content-type", "x-request-id", "retry-after", "retry-after-ms")
# Headers every answer carries and batchyard never reads, in the spellings servers use (skipped at once).
_IGNORED_HEADERS = frozenset(
    spelling
    for name in ("server", "date", "content-type", "connection", "keep-alive", "vary", "cache-control")
    for spelling in (name.encode(), name.title().encode())
)


class _Stale(Exception):
    """A pooled connection turned out closed before any byte of the answer came back."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection; one request at a time."""

    def __init__(self, max_body: int) -> None:
        self._max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[UpstreamResponse | None] | None = None
        self._received = False  # a byte of the current answer arrived
        self._begin()

    def _begin(self) -> None:
        self._head_bytes = 0
        self._headers: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._framed = False  # Content-Length or chunked: the end of the body is known without EOF
        self._error: BaseException | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():  # bytes nobody asked for: the stream is out of step
            self.close()
            return
        self._received = True
        if not self._headers_done:
            self._head_bytes += len(
                data
            )  # an upstream's head is bounded like its body (llhttp would buffer it all)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    UpstreamError("too_large", f"upstream response head exceeded {MAX_HEAD_BYTES} bytes")
                )
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail(UpstreamError("connect", "upstream connection failed: malformed HTTP response"))
        if self._error is not None:
            self._fail(self._error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and not self._framed and self._error is None and exc is None:
            self._finish()  # the body was delimited by a clean end of the connection
        elif not self._received:
            waiter.set_exception(_Stale())
        else:
            name = type(exc).__name__ if exc is not None else "ServerDisconnectedError"
            waiter.set_exception(UpstreamError("connect", f"upstream connection failed: {name}"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name in _IGNORED_HEADERS:  # the usual ones, as servers spell them: no lower-casing
            return
        key = name.lower()
        if key in _KEPT_HEADERS:
            self._headers[key.decode()] = value.decode("latin-1")
        elif key == b"content-length":
            self._framed = True
            try:
                length = int(value)
            except ValueError:
                return  # llhttp rejects it
            if length > self._max_body:
                self._error = UpstreamError("too_large", f"upstream response exceeded {self._max_body} bytes")
        elif key == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_body:
            self._error = UpstreamError("too_large", f"upstream response exceeded {self._max_body} bytes")
        elif self._error is None:
            self._chunks.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows on the same stream
        if self._error is None:
            self._finish()

    # requests

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        status = self._parser.get_status_code()
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        rid = self._headers.get("x-request-id") or request_id()
        waiter.set_result(UpstreamResponse(status, self._headers, body, rid))
        if not self._parser.should_keep_alive():
            self.close()

    def _fail(self, error: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _deadline_passed(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError())

    async def send(self, head: bytes, body: bytes, deadline: float) -> UpstreamResponse:
        """One exchange; TimeoutError at `deadline` (loop time): a timer handle on the loop, cheaper than an
        `asyncio.timeout` around the whole call (a context manager, the current task, a reschedule and the
        cancellation bookkeeping; ~0.5 us a request in `bench/http_client.py`)."""
        assert self.transport is not None
        if self.closed or self.transport.is_closing():
            raise _Stale()
        self._received = False
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[UpstreamResponse | None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(deadline, self._deadline_passed)
        self.transport.writelines((head, body))
        try:
            resp = await waiter
        finally:
            timer.cancel()
            self._waiter = None
        assert resp is not None
        return resp


class HTTPUpstream(Upstream):
    preemptible = True  # a cancelled request aborts its connection (`_exchange`): the engine stops on its own

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        name: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        ssl_context: ssl.SSLContext | None = None,
        stream_lines: StreamLines = "auto",
        preemptible_streams: bool = False,
    ) -> None:
        """`ssl_context`: how https:// upstreams are verified (default: the system's trust store). `stream_lines`:
        which batch requests go as streams (upstreams/streamed.py): `auto` to a llama.cpp server (it answers
        `GET /props`: `engine_slots`), `on` to any, `off` none; `preemptible_streams`: online requests may cut
        those short (`Upstream.preemptible_streams`)."""
        self.base_url = base_url.rstrip("/")
        self.name = name or self.base_url
        self._max_body = max_body
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream URL must be http(s)://HOST[:PORT]/...: {base_url!r}")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = self._port == (443 if self._tls else 80)
        authority = host if default_port else f"{host}:{self._port}"
        fixed = [f"Host: {authority}", "User-Agent: batchyard", "Content-Type: application/json"]
        if api_key and any(c in api_key for c in "\r\n\0"):
            raise ValueError("the upstream API key contains a line break or NUL")
        if api_key:
            fixed.append(f"Authorization: Bearer {api_key}")
        self._fixed_headers = ("\r\n".join(fixed) + "\r\n").encode("latin-1")
        self._ssl = ssl_context
        self._idle: list[_Connection] = []
        self._origin = f"{parts.scheme}://{authority}"
        self._stream_headers = {"Content-Type": "application/json", "User-Agent": "batchyard"}
        if api_key:
            self._stream_headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        self._starts: dict[tuple[str, str], bytes] = {}
        self._stream_lines = stream_lines == "on"  # "auto": once /props answered
        self._auto_streams = stream_lines == "auto"
        self.preemptible_streams = preemptible_streams

    async def start(self) -> None:
        if self._tls and self._ssl is None:
            self._ssl = ssl.create_default_context()

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _path(self, endpoint: str) -> str:
        return self._prefix + (endpoint[3:] if endpoint.startswith("/v1/") else endpoint)

    async def _connect(self) -> _Connection:
        if self._tls and self._ssl is None:
            await self.start()
        loop = asyncio.get_running_loop()
        max_body = self._max_body
        _, conn = await loop.create_connection(
            lambda: _Connection(max_body),
            self._host,
            self._port,
            ssl=self._ssl if self._tls else None,
            server_hostname=self._host if self._tls else None,
        )
        return conn

    async def _exchange(self, head: bytes, body: bytes, deadline: float) -> UpstreamResponse:
        while True:
            conn: _Connection | None = None
            while self._idle:
                candidate = self._idle.pop()  # the most recently used: the least likely to have timed out
                if not candidate.closed:
                    conn = candidate
                    break
            reused = conn is not None
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connect()
            try:
                resp = await conn.send(head, body, deadline)
            except _Stale:
                conn.close()
                if reused:
                    continue  # the server had closed it while idle; nothing of an answer came back: send anew
                raise UpstreamError(
                    "connect", "upstream connection failed: ServerDisconnectedError"
                ) from None
            except BaseException:
                conn.abort()  # cancelled (the deadline) or failed mid-answer: never reuse this connection
                raise
            if not conn.closed:
                self._idle.append(conn)
            return resp

    async def list_models(self, *, timeout: float) -> list[str] | None:
        try:
            resp = await self.call("/v1/models", b"", timeout=timeout, method="GET")
        except UpstreamError:
            return None
        if resp.status != 200:
            return None
        try:
            data = orjson.loads(resp.body).get("data")
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            return None

    async def engine_slots(self, *, timeout: float) -> int | None:
        """How many requests the engine behind this URL runs at once, where it says so: llama.cpp's server answers
        `GET /props` with `total_slots` (the path is the base URL's, less its `/v1`). None otherwise."""
        root = self._prefix[:-3] if self._prefix.endswith("/v1") else self._prefix
        try:
            resp = await self._request("GET", root + "/props", b"", timeout)
            if resp.status != 200:
                return None
            slots = orjson.loads(resp.body).get("total_slots")
        except (UpstreamError, orjson.JSONDecodeError, AttributeError):
            return None
        if type(slots) is not int or not 0 < slots <= 65536:
            return None
        # llama.cpp's server finishes a plain request whose client went away (cutting one frees no slot and wastes
        # its work: docs/priority.md), and stops a stream at once: its lines go as streams (`auto`), and only
        # those may be cut short
        self.preemptible = False
        self._stream_lines = self._stream_lines or self._auto_streams
        return slots

    def streams(self, endpoint: str, body: dict[str, Any]) -> bool:
        return self._stream_lines and streamed.streamable(endpoint, body)

    async def call_streamed(self, endpoint: str, body: dict[str, Any], *, timeout: float) -> UpstreamResponse:
        """The request as a stream; its events assembled into the answer it would have had whole (a cancel
        closes the connection mid-stream, which stops the engine). The body cap applies to the events."""
        resp = await self._request("POST", self._path(endpoint), streamed.stream_payload(body), timeout)
        if not 200 <= resp.status < 300 or not streamed.is_event_stream(resp.body):
            return resp  # an error, or the engine answered whole
        try:
            answer, error = streamed.assemble(endpoint, resp.body)
        except streamed.BrokenStream as e:
            raise UpstreamError("connect", f"upstream stream broken: {e}") from None
        # an error event after the head (llama.cpp: the generation failed): a server error, as a whole answer has
        return UpstreamResponse(500 if error else resp.status, resp.headers, answer, resp.request_id)

    async def call(
        self,
        endpoint: str,
        body: bytes,
        *,
        timeout: float,
        method: str = "POST",
    ) -> UpstreamResponse:
        """POST `body` to `endpoint` (e.g. "/v1/chat/completions", relative to the base URL)."""
        return await self._request(method, self._path(endpoint), body, timeout)

    async def _request(self, method: str, path: str, body: bytes, timeout: float) -> UpstreamResponse:
        start = self._starts.get((method, path))
        if start is None:  # the request line and fixed headers, built once per method and path
            start = b"%s %s HTTP/1.1\r\n%s" % (
                method.encode("ascii"),
                path.encode("latin-1"),
                self._fixed_headers,
            )
            if len(self._starts) < 64:
                self._starts[(method, path)] = start
        head = b"%sContent-Length: %d\r\n\r\n" % (start, len(body))
        try:
            return await self._exchange(head, body, asyncio.get_running_loop().time() + timeout)
        except TimeoutError as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout:g}s") from e
        except UpstreamError:
            raise
        except ssl.SSLError as e:
            raise UpstreamError("connect", f"upstream TLS failed: {e.reason or type(e).__name__}") from e
        except OSError as e:
            raise UpstreamError(
                "connect", f"upstream connection failed: {e.strerror or type(e).__name__}"
            ) from e

    # online requests (aiohttp: see the module's docstring)

    def _stream_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            tls: ssl.SSLContext | bool = False
            if self._tls:
                tls = self._ssl = self._ssl or ssl.create_default_context()
            connector = aiohttp.TCPConnector(limit=0, ssl=tls)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._stream_headers,
                skip_auto_headers=("Accept-Encoding",),  # identity: the bytes pass through as they were sent
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def stream(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamStream:
        """POST `body` and hand back the answer as it arrives: the head within `timeout`, then each chunk within
        `timeout` of the one before; the body capped like `call`'s (`too_large` once past it)."""
        url = self._origin + self._path(endpoint)
        try:
            async with asyncio.timeout(timeout):
                resp = await self._stream_session().post(url, data=body, allow_redirects=False)
        except TimeoutError as e:
            raise UpstreamError("timeout", f"upstream did not answer within {timeout:g}s") from e
        except ssl.SSLError as e:  # aiohttp's certificate errors are ones too, without a `reason`
            reason = getattr(e, "reason", None) or type(e).__name__
            raise UpstreamError("connect", f"upstream TLS failed: {reason}") from e
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError("connect", f"upstream connection failed: {type(e).__name__}") from e
        headers = {name: resp.headers[name] for name in STREAM_HEADERS if name in resp.headers}
        return UpstreamStream(resp.status, headers, self._chunks(resp, timeout), _closer(resp))

    async def _chunks(self, resp: aiohttp.ClientResponse, timeout: float) -> AsyncIterator[bytes]:
        size = 0
        try:
            while True:
                async with asyncio.timeout(timeout):
                    data = await resp.content.readany()
                if not data:
                    return
                size += len(data)
                if size > self._max_body:
                    raise UpstreamError("too_large", f"upstream response exceeded {self._max_body} bytes")
                yield data
        except TimeoutError as e:
            raise UpstreamError("timeout", f"upstream sent nothing for {timeout:g}s") from e
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError("connect", f"upstream connection failed: {type(e).__name__}") from e
        finally:
            resp.close()  # a no-op once the body was read whole (its connection went back to the pool)


def _closer(resp: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        resp.close()  # mid-answer: the connection is dropped, which ends the upstream's work on it

    return close
