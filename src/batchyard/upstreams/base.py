"""The upstream interface: one inference backend that answers OpenAI-shaped requests.

UpstreamError            the call produced no usable HTTP response
├── kind "connect"       connection refused/reset, DNS, TLS      (retryable)
├── kind "timeout"       the attempt's overall deadline passed   (retryable)
└── kind "too_large"     the response body exceeded the cap      (not retryable)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    request_id: str | None


@dataclass(slots=True)
class UpstreamStream:
    """An answer whose body arrives as it is produced (server-sent events): the head now, `chunks` as they come.

    `chunks` raises UpstreamError when the answer breaks off; `aclose` ends the request early (the client went
    away) and is safe to call at any time, more than once."""

    status: int
    headers: dict[str, str]  # lower-cased names
    chunks: AsyncIterator[bytes]
    closer: Callable[[], Awaitable[None]] | None = None

    async def aclose(self) -> None:
        closer, self.closer = self.closer, None
        finish = getattr(self.chunks, "aclose", None)  # an async generator's own clean-up
        if finish is not None:
            await finish()
        if closer is not None:
            await closer()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class UpstreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def retryable(self) -> bool:
        return self.kind in ("connect", "timeout")


class Upstream(ABC):
    name: str
    # A request cut short (its task cancelled) frees its engine slot: true of an HTTP upstream (the connection is
    # closed, the engine stops), not of an engine in this process that finishes the request in the background.
    preemptible: bool = False
    # Of the requests sent as streams (`streams`), whether an online request may cut them short: `pause` only, on an
    # engine whose slots share a few CPU cores (docs/priority.md: under `slots` a cut there wastes the line's work
    # and the online request still shares the cores with the others). A cancel cuts them in any mode (after `cancel_grace`).
    preemptible_streams: bool = False

    @abstractmethod
    async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
        """POST body to endpoint (e.g. "/v1/chat/completions"); the whole attempt finishes within timeout."""

    def streams(self, endpoint: str, body: dict[str, Any]) -> bool:
        """Whether this batch request goes as a stream (`call_streamed`): an engine that stops a stream whose
        client left, and not a plain request, can then have it cut short (upstreams/streamed.py)."""
        return False

    async def call_streamed(self, endpoint: str, body: dict[str, Any], *, timeout: float) -> UpstreamResponse:
        """`call` with the request sent as a stream, and the answer assembled as a plain request gets it."""
        raise NotImplementedError

    async def stream(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamStream:
        """POST body to endpoint and hand back the answer as it arrives (online requests: the front door).
        `timeout` bounds the wait for the answer's head and for each chunk after it. This default waits for the
        whole answer (`call`) and hands it over in one chunk."""
        resp = await self.call(endpoint, body, timeout=timeout)
        return UpstreamStream(resp.status, resp.headers, _once(resp.body))

    async def list_models(self, *, timeout: float) -> list[str] | None:
        """The model ids this upstream serves (its /v1/models), or None when it cannot say."""
        return None

    async def engine_slots(self, *, timeout: float) -> int | None:
        """How many requests the engine runs at once, when it says (None: unknown)."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open connections (called once, inside the event loop)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
