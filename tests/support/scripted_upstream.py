"""A misbehaving upstream for the front door's tests: raw HTTP/1.1 bytes, chosen by the request body's `script`.

`tests/support/fake_upstream.py` answers like a well-behaved OpenAI server (aiohttp writes its heads); this one
writes whatever a broken or hostile upstream could: a status HTTP has not, a 101, an HTML 500, an event stream
framed by the connection's close and cut mid-event, a reset after the head. Each request's head and body are kept
(`heads`, `bodies`) so a test can check what reached it (whose Authorization, which bytes).

    with ScriptedUpstream() as up:
        ... --upstream raw={up.base_url} ...   # then POST {"model": "raw", "script": "html_500"}

`script` names one of SCRIPTS below (`ok` when absent). `sse_hold` sends one event, then waits until `release()`
(one release per held stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType

Script = Callable[["ScriptedUpstream", asyncio.StreamWriter], Awaitable[bool]]  # True: keep the connection

OK_BODY = b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"raw","choices":[]}'
EVENT = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"raw",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
)
DONE = b"data: [DONE]\n\n"


def _answer(status: bytes, headers: list[bytes], body: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, *headers, b"content-length: %d" % len(body)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reset(w: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = w.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _ok(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(_answer(b"200 OK", [b"content-type: application/json"], OK_BODY))
    return True


async def _headers(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """A 200 with every header a front door must not pass on, beside the three it passes."""
    extra = [
        b"content-type: application/json",
        b"set-cookie: session=upstream-secret",
        b"connection: keep-alive",
        b"keep-alive: timeout=5",
        b"proxy-authenticate: Basic",
        b"www-authenticate: Bearer",
        b"authorization: Bearer sk-upstream-echo",
        b"x-api-key: sk-upstream-echo",
        b"upgrade: h2c",
        b"location: http://169.254.169.254/",
        b"x-request-id: req_upstream1",
        b"retry-after: 3",
    ]
    w.write(_answer(b"200 OK", extra, OK_BODY))
    return True


async def _status_999(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(_answer(b"999 Whatever", [b"content-type: application/json"], OK_BODY))
    return True


async def _status_101(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
    await w.drain()
    await asyncio.sleep(0.2)
    return False


async def _html_500(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(
        _answer(b"500 Internal Server Error", [b"content-type: text/html"], b"<html>Internal Error</html>")
    )
    return True


async def _text_400(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(_answer(b"400 Bad Request", [b"content-type: text/plain"], b"bad request, says the engine"))
    return True


async def _auth_401(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """OpenAI's answer to a wrong key, naming part of it: here, batchyard's key for this upstream."""
    body = (
        b'{"error":{"message":"Incorrect API key provided: sk-upstr***-key.","type":"invalid_request_error",'
        b'"param":null,"code":"invalid_api_key"}}'
    )
    w.write(
        _answer(b"401 Unauthorized", [b"content-type: application/json", b"www-authenticate: Bearer"], body)
    )
    return True


async def _vllm_400(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """Older vLLM's error: OpenAI's fields at the top level, not in an `error` object."""
    body = (
        b'{"object":"error","message":"This model\'s maximum context length is 4096 tokens.",'
        b'"type":"BadRequestError","param":null,"code":400}'
    )
    w.write(_answer(b"400 Bad Request", [b"content-type: application/json"], body))
    return True


async def _tgi_422(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """TGI's (and Ollama's) error: a string in `error`."""
    body = b'{"error":"Input validation error: `inputs` must have less than 1024 tokens","error_type":"validation"}'
    w.write(_answer(b"422 Unprocessable Entity", [b"content-type: application/json"], body))
    return True


async def _json_503(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    body = b'{"error":{"message":"overloaded","type":"server_error","param":null,"code":"busy"}}'
    w.write(_answer(b"503 Service Unavailable", [b"content-type: application/json", b"retry-after: 2"], body))
    return True


async def _sse_to_eof(w: asyncio.StreamWriter, body: bytes) -> bool:
    """An event stream framed by the connection's end (no chunked encoding): `body`, then the connection closes."""
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n" + body)
    await w.drain()
    return False


async def _sse_eof_mid_event(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """Closed in the middle of an event."""
    return await _sse_to_eof(w, EVENT + b'data: {"id":"c1","obj')


async def _sse_eof_whole(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """Ended after a whole event with CRLF line ends (a proper end)."""
    return await _sse_to_eof(w, EVENT.replace(b"\n", b"\r\n") + DONE.replace(b"\n", b"\r\n"))


async def _sse_eof_no_blank_line(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """Whole, but its last event (`data: [DONE]`) lacks the blank line after it."""
    return await _sse_to_eof(w, EVENT + b"data: [DONE]\n")


async def _sse_reset(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    w.write(_chunk(EVENT))
    await w.drain()
    await asyncio.sleep(0.05)
    _reset(w)
    return False


async def _sse_hold(
    up: ScriptedUpstream, w: asyncio.StreamWriter, content_type: bytes = b"text/event-stream"
) -> bool:
    """One event, then nothing until `release()` (10 s at most), then the rest. A release from before this request
    (one that found no stream held, or came after a stream's 10 s) does not count: it would let this one end before
    its client looked at it."""
    released = up._released
    assert released is not None
    released.clear()
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n" % content_type)
    w.write(_chunk(EVENT))
    await w.drain()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(released.wait(), 10)
    released.clear()  # the next one waits for its own release
    w.write(_chunk(DONE) + b"0\r\n\r\n")
    return True


async def _sse_hold_odd_case(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """The same, its media type written in another case (media types compare without case)."""
    return await _sse_hold(up, w, b"Text/Event-Stream; charset=UTF-8")


async def _sse_one_huge_event(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """One event of 24 MiB (no blank line until its end) in 1 KiB chunks, then a small one."""
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    w.write(_chunk(b'data: {"x":"'))
    piece = _chunk(b"x" * 1024)
    for _ in range(24 * 1024):
        w.write(piece)
        if w.transport.get_write_buffer_size() > 1 << 20:
            await w.drain()
    w.write(_chunk(b'"}\n\n') + _chunk(EVENT) + _chunk(DONE) + b"0\r\n\r\n")
    return True


async def _sse_never_ends(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    """One event, then a keep-alive comment every 10 ms, for ever."""
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    w.write(_chunk(EVENT))
    while True:
        w.write(_chunk(b": keep-alive\n\n"))
        await w.drain()
        await asyncio.sleep(0.01)


async def _reset_at_once(up: ScriptedUpstream, w: asyncio.StreamWriter) -> bool:
    _reset(w)
    return False


SCRIPTS: dict[str, Script] = {
    "ok": _ok,
    "headers": _headers,
    "status_999": _status_999,
    "status_101": _status_101,
    "html_500": _html_500,
    "text_400": _text_400,
    "json_503": _json_503,
    "vllm_400": _vllm_400,
    "tgi_422": _tgi_422,
    "auth_401": _auth_401,
    "sse_eof_mid_event": _sse_eof_mid_event,
    "sse_eof_whole": _sse_eof_whole,
    "sse_eof_no_blank_line": _sse_eof_no_blank_line,
    "sse_reset": _sse_reset,
    "sse_hold": _sse_hold,
    "sse_hold_odd_case": _sse_hold_odd_case,
    "reset_at_once": _reset_at_once,
    "sse_one_huge_event": _sse_one_huge_event,
    "sse_never_ends": _sse_never_ends,
}


def _script_of(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return "ok"
    name = parsed.get("script", "ok") if isinstance(parsed, dict) else "ok"
    return name if isinstance(name, str) and name in SCRIPTS else "ok"


class ScriptedUpstream:
    """Served from a background thread on 127.0.0.1 (`base_url`)."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scripted-upstream", daemon=True)
        self._server: asyncio.Server | None = None
        self._released: asyncio.Event | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def release(self) -> None:
        """Let every `sse_hold` stream held now end."""
        released = self._released
        assert released is not None
        self._loop.call_soon_threadsafe(released.set)

    def __enter__(self) -> ScriptedUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted upstream did not start")
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._released = asyncio.Event()
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        assert self._server is not None
        self._server.close()
        left = asyncio.all_tasks(self._loop)  # connections still being answered (a test that failed mid-way)
        for task in left:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self._loop.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            keep = True
            while keep:
                head = await r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await r.readexactly(length)
                self.heads.append(head)
                self.bodies.append(body)
                keep = await SCRIPTS[_script_of(body)](self, w)
                await w.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            w.close()
