"""The HTTP server of the API, with limits on everything a client controls before the app sees a request.

`build_server(app, settings)` gives a `uvicorn.Server` whose protocol is `EdgeProtocol`: uvicorn's httptools
protocol with six limits added (all in `Settings`, flags of `batchyard serve`):

- the request head (request line and headers) may be `max_head_bytes` long (64 KiB) and carry `max_headers`
  headers (100); beyond either, 431 Request Header Fields Too Large in the OpenAI envelope, and the connection
  is closed. The bytes of an unfinished head are counted as they arrive, so memory stays bounded however long a
  header the client sends;
- a head must be complete within `head_timeout` seconds (10) of its first byte, or of the connection's opening
  (slowloris): then 408 (or a silent close when nothing came) and close;
- an idle keep-alive connection is closed after `keep_alive_timeout` seconds (5);
- a request body that stops arriving is cut after `body_timeout` seconds without a byte (60; time while the
  server itself paused reading does not count), so a slow-body client cannot hold a connection for ever;
- at most `max_connections` connections (1000) are open. At the bound, a new connection closes the oldest idle
  one (no request in flight: a keep-alive connection, or a head still coming), as nginx reuses keep-alive
  connections when it runs out; when every connection has a request in flight, the newcomer gets 503 and is
  closed. So idle or half-sent connections can never lock out `/health` or a real client, and no request being
  served is cut.

Why this and not a server's own settings (`python bench/http_edge.py`; figures in docs/performance.md, "HTTP edge
under abuse"):
- uvicorn with httptools (its default, what batchyard ran) has no head limit: httptools appends each piece of a
  header to a bytes object, so one 128 MiB header took the API's RSS up by 160 MiB, with quadratic copying
  (/health p99 6.4 s, max 8.0 s during it); 10,000 headers are accepted; a half head stays open for ever (there is
  no head timeout); and `limit_concurrency` answers 503 to *every* new request once idle connections fill it.
- uvicorn's h11 protocol with `h11_max_incomplete_event_size=65536` and `limit_concurrency=1000` bounds the
  128 MiB header (400, not 431) but still accepted 10,000 headers sent at once, kept a half head open for ever,
  and with 2,000 idle connections open answered /health with 503 every time.
- hypercorn 0.18 and granian 2.8 (`python bench/http_edge_servers.py`) both answer 431 to the big and the many
  headers and close a half head (after 5 s and 10 s), but neither bounds connections: 2,000 idle ones are all
  held, and granian's /health then takes 4 s at p99. Either would also replace the server that the rest of
  batchyard (lifespan, shutdown on a dead worker) is built on, for limits that about 150 lines on uvicorn's
  protocol give.
The added code is on the head path only: a body's bytes go through httptools exactly as before (100 MB uploads
took 0.42-0.90 s before and 0.47-0.61 s after on a shared 2-core machine: no difference within the noise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchyard import ids
from batchyard.api.access import AccessLog
from batchyard.config import Settings

log = logging.getLogger("batchyard.api.server")


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    body_timeout: float = 60.0

    @classmethod
    def of(cls, settings: Settings) -> EdgeLimits:
        return cls(
            max_head_bytes=settings.max_head_bytes,
            max_headers=settings.max_headers,
            head_timeout=settings.head_timeout,
            keep_alive_timeout=settings.keep_alive_timeout,
            max_connections=settings.max_connections,
            body_timeout=settings.body_timeout,
        )


def _response(status: int, reason: str, message: str, *, type_: str, code: str) -> bytes:
    """The whole answer, with `_RID` where each one's own `x-request-id` goes (`_with_id`)."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nx-request-id: {_RID.decode()}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_RID = b"req_" + b"0" * 32  # as long as an id: replaced by the answer's own


def _with_id(response: bytes) -> tuple[bytes, str]:
    """An edge answer with an `x-request-id` of its own, as every API answer has (api/access.py)."""
    rid = ids.http_request_id()
    return response.replace(_RID, rid.encode("ascii"), 1), rid


HEAD_TOO_LARGE = _response(
    431,
    "Request Header Fields Too Large",
    "The request head (request line and headers) is too large or has too many headers.",
    type_="invalid_request_error",
    code="request_header_fields_too_large",
)
HEAD_TIMEOUT = _response(
    408,
    "Request Timeout",
    "The request head did not arrive in time.",
    type_="invalid_request_error",
    code="request_timeout",
)
BUSY = _response(
    503,
    "Service Unavailable",
    "The server has too many connections; retry later.",
    type_="server_error",
    code="too_many_connections",
)


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the limits."""


class Edge:
    """The connections of one server: how many are open, and the idle ones, oldest first."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.open = 0
        self.idle: dict[EdgeProtocol, None] = {}  # insertion-ordered: the first is the oldest idle

    def admit(self, conn: EdgeProtocol) -> bool:
        """Count `conn` in; at the bound, close the oldest idle connection first. False: refuse `conn`."""
        if self.open >= self.limits.max_connections:
            if not self.idle:
                return False
            oldest = next(iter(self.idle))
            self.forget(oldest)
            oldest.evict()
        self.open += 1
        self.idle[conn] = None
        return True

    def set_idle(self, conn: EdgeProtocol, idle: bool) -> None:
        self.idle.pop(conn, None)
        if idle:
            self.idle[conn] = None  # to the end: the most recently idle

    def forget(self, conn: EdgeProtocol) -> None:
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self.idle.pop(conn, None)


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the head limits, the head timer and the connection bound."""

    edge: ClassVar[Edge]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = self.edge.limits
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]  # a float works
        self.counted = False
        self.reading_head = True
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.reading_body = False
        self.body_data_at = 0.0  # when the last bytes of the body being read came
        self.body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.edge.admit(self):
            log.warning("connection refused: %d connections, all with a request in flight", self.edge.open)
            self._reject(BUSY)
            return
        self.counted = True
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.forget(self)
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.reading_body:
            self.body_data_at = self.loop.time()
        if self.reading_head:
            self.head_bytes += len(data)
            if self.head_timer is None:
                self._arm_head_timer()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _HeadTooLarge):
                self._reject(HEAD_TOO_LARGE)
            else:
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self.reading_head and self.head_bytes > self.limits.max_head_bytes:
            self._reject(HEAD_TOO_LARGE)

    # parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.header_count = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        if self.header_count > self.limits.max_headers:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.reading_head = False
        self._cancel_head_timer()
        self.edge.set_idle(self, False)
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_head_bytes:
            raise _HeadTooLarge
        super().on_headers_complete()
        self.reading_body = True
        self.body_data_at = self.loop.time()
        self._arm_body_timer()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_head = True
        self.head_bytes = 0
        self.reading_body = False
        self._cancel_body_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.counted and not self.transport.is_closing() and not self.pipeline:
            self.edge.set_idle(self, True)

    # the limits' actions
    def evict(self) -> None:
        """Closed to make room for a new connection (this one is idle)."""
        self._cancel_head_timer()
        self.transport.close()

    def _reject(self, response: bytes) -> None:
        self._cancel_head_timer()
        self.edge.forget(self)
        if not self.transport.is_closing():
            answer, rid = _with_id(response)
            log.debug("edge answered %s (request id %s)", answer[9:12].decode(), rid)
            self.transport.write(answer)
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _arm_body_timer(self) -> None:
        self.body_timer = self.loop.call_later(self.limits.body_timeout / 4, self._check_body)

    def _cancel_body_timer(self) -> None:
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _check_body(self) -> None:
        """A body that stops arriving (slowloris on the body) holds a connection and a request; it is cut after
        `body_timeout` seconds without a byte. Time while uvicorn itself paused reading (the app is slower than
        the client) does not count."""
        self.body_timer = None
        if not self.reading_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow is not None and self.flow.read_paused:
            self.body_data_at = now
        elif now - self.body_data_at > self.limits.body_timeout:
            log.info("closing a connection whose request body stalled for %.0f s", self.limits.body_timeout)
            self.reading_body = False
            self.edge.forget(self)
            self.transport.close()  # the app sees a disconnect: a partial upload is removed
            return
        self._arm_body_timer()

    def _head_timed_out(self) -> None:
        self.head_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or not self.reading_head or busy:
            return  # a pipelined head behind a request in flight: the keep-alive timer bounds it afterwards
        if self.head_bytes:
            self._reject(HEAD_TIMEOUT)
        else:
            self.edge.forget(self)
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, told when it listens (`on_started(url)`) and when a signal asks it to stop
    (`on_signal()`, called in the signal handler itself: before anything else runs, so the worker children that
    the same Ctrl-C stops are known to be stopping). A signal that stopped it is not raised again once it has
    shut down (uvicorn does: SIGINT then became click's "Aborted!" and exit 1, SIGTERM a death by signal): after
    a clean shutdown `serve` exits 0."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[str], None] | None = None,
        on_signal: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self.on_started = on_started
        self.on_signal = on_signal

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_started(f"http://{f'[{host}]' if ':' in host else host}:{port}")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_signal is not None:
            self.on_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # handled: shut down cleanly, nothing to raise again


def build_server(
    app: Any,
    settings: Settings,
    *,
    on_started: Callable[[str], None] | None = None,
    on_signal: Callable[[], None] | None = None,
) -> Server:
    """A uvicorn server for `app` on settings.host:port with the edge limits of `settings`, the access log and
    `x-request-id` (api/access.py) around the app; uvicorn's loggers go through batchyard's (`logs.setup`)."""
    protocol = type("BoundEdgeProtocol", (EdgeProtocol,), {"edge": Edge(EdgeLimits.of(settings))})
    config = uvicorn.Config(
        AccessLog(app),
        host=settings.host,
        port=settings.port,
        http=protocol,
        ws="none",  # the API has no WebSocket route; an upgraded connection would leave the edge's count
        log_level="warning",
        access_log=False,  # api/access.py logs each request, with its id
        log_config=None,  # uvicorn's lines go through the handler of `logs.setup` (text or JSON)
        lifespan="on",
        timeout_keep_alive=max(1, round(settings.keep_alive_timeout)),  # the protocol uses the exact float
        backlog=2048,
    )
    return Server(config, on_started, on_signal)
