"""The HTTP edge bounds what a client controls: head size, header count, time to send a head, idle keep-alive
connections and the number of connections, with `/health` answering while the port is abused (issue 9, item 3).

Every test talks raw HTTP/1.1 over real sockets to a real `batchyard serve` subprocess.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.support.fake_upstream import FakeUpstream

# Short timeouts and a small connection bound so that each test runs in seconds.
EDGE_ARGS = ["--head-timeout", "1", "--keep-alive-timeout", "1", "--max-connections", "50"]
HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture
def edge(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    return make_server("--upstream", upstream.base_url, "--no-worker", *EDGE_ARGS)


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float | None]:
    """What the server sent, and the seconds until it closed the connection (None: still open after `limit`)."""
    started = time.monotonic()
    got = b""
    while (left := limit - (time.monotonic() - started)) > 0:
        readable, _, _ = select.select([s], [], [], left)
        if not readable:
            break
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got, time.monotonic() - started
        if not chunk:
            return got, time.monotonic() - started
        got += chunk
    return got, None


def error_code(response: bytes) -> str:
    body = response.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["error"]["code"])


def upload_head_and_part(s: socket.socket) -> bytes:
    """Send the head of a file upload and the start of its body; the rest of the body is returned (to send)."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nuser_data\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--b--\r\n"
    )
    s.sendall(
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body[:20]
    )
    return body[20:]


def health_seconds(srv: Server) -> float:
    """Seconds for GET /health from a fresh connection, until the whole answer is read."""
    started = time.perf_counter()
    with connect(srv) as s:
        s.sendall(HEAD + b"Connection: close\r\n\r\n")
        got, _ = read_until_closed(s, 10)
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    return time.perf_counter() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stream_header(s: socket.socket, total: int, stop: threading.Event | None = None) -> int:
    """Send one header of `total` bytes, stopping early when the server answers or closes; bytes sent."""
    s.sendall(HEAD + b"X-Big: ")
    chunk = b"a" * 65536
    sent = 0
    while sent < total and not (stop and stop.is_set()):
        if select.select([s], [], [], 0)[0]:
            break  # the server answered: stop sending, read it
        try:
            s.sendall(chunk)
        except OSError:
            break
        sent += len(chunk)
    return sent


def test_an_oversized_head_gets_431_and_is_closed_without_growing_memory(edge: Server) -> None:
    assert edge.proc is not None
    before = rss_kib(edge.proc.pid)
    with connect(edge) as s:
        sent = stream_header(s, 64 * 1024 * 1024)
        grown = rss_kib(edge.proc.pid) - before  # while the connection is (or would be) held
        got, closed = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 431 "), got[:100]
    assert error_code(got) == "request_header_fields_too_large"
    assert closed is not None
    assert sent < 16 * 1024 * 1024  # refused early, not after the whole stream
    assert grown < 8 * 1024, f"the server grew by {grown} KiB"
    assert health_seconds(edge) < 1


def test_too_many_headers_get_431(edge: Server) -> None:
    rids = []
    for _ in range(2):
        with connect(edge) as s:
            s.sendall(
                HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n"
            )  # 2 KiB: only the count
            got, closed = read_until_closed(s, 5)
        assert got.startswith(b"HTTP/1.1 431 "), got[:100]
        assert closed is not None
        m = re.search(rb"\r\nx-request-id: (req_[0-9a-f]{32})\r\n", got.partition(b"\r\n\r\n")[0])
        assert m is not None, got[:300]  # the edge's own answers carry an id, as every API answer does
        rids.append(m.group(1))
    assert rids[0] != rids[1]
    with connect(edge) as s:  # 100 headers, the limit: served
        s.sendall(HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(98)) + b"Connection: close\r\n\r\n")
        got, _ = read_until_closed(s, 5)
    assert got.startswith(b"HTTP/1.1 200 "), got[:100]


def test_a_half_sent_head_is_closed_after_the_head_timeout(edge: Server) -> None:
    with connect(edge) as half, connect(edge) as silent:
        half.sendall(HEAD)
        got, closed = read_until_closed(half, 6)
        assert closed is not None and 0.5 < closed < 4, closed
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        got, closed = read_until_closed(silent, 6)  # a connection that never sends anything: closed too
        assert closed is not None and closed < 4, closed
        assert got == b""


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (head and Content-Length body), however the server split it into segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body


def test_an_idle_keep_alive_connection_is_closed(edge: Server) -> None:
    with connect(edge) as s:
        s.sendall(HEAD + b"\r\n")
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        s.sendall(HEAD + b"\r\n")  # still open and served a moment later
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        _, closed = read_until_closed(s, 6)
    assert closed is not None and 0.5 < closed < 3, closed


def test_connections_beyond_the_bound_do_not_lock_out_health_nor_cut_requests_in_flight(edge: Server) -> None:
    busy = connect(edge)  # a request in flight: its head is in, its body still coming
    rest = upload_head_and_part(busy)
    time.sleep(0.2)
    flood = [connect(edge) for _ in range(200)]  # idle connections, four times the bound of 50
    try:
        time.sleep(0.5)
        assert health_seconds(edge) < 1
        closed = 0
        for s in flood:
            _, when = read_until_closed(s, 0.01)
            closed += when is not None
        assert closed >= 200 - 50, f"only {closed} of 200 idle connections were closed"
        busy.sendall(rest)  # the request in flight was not cut: it gets its answer
        got, _ = read_until_closed(busy, 3)
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
    finally:
        busy.close()
        for s in flood:
            s.close()


def test_at_the_bound_with_every_connection_busy_a_newcomer_gets_503(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--no-worker", "--max-connections", "3")
    busy = [connect(srv) for _ in range(3)]
    try:
        rests = [upload_head_and_part(s) for s in busy]
        time.sleep(0.3)
        with connect(srv) as s:
            got, closed = read_until_closed(s, 5)
        assert got.startswith(b"HTTP/1.1 503 "), got[:100]
        assert error_code(got) == "too_many_connections"
        assert closed is not None
        for s, rest in zip(busy, rests, strict=True):  # the three in flight are served to the end
            s.sendall(rest)
            got, _ = read_until_closed(s, 3)
            assert got.startswith(b"HTTP/1.1 200 "), got[:100]
    finally:
        for s in busy:
            s.close()


def test_health_stays_fast_while_an_attacker_streams_huge_headers(edge: Server) -> None:
    stop = threading.Event()
    streamed = [0]

    def attack() -> None:
        while not stop.is_set():
            try:
                with connect(edge) as s:
                    streamed[0] += stream_header(s, 256 * 1024 * 1024, stop)
            except OSError:
                continue

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    try:
        time.sleep(0.5)
        latencies = []
        for _ in range(20):
            latencies.append(health_seconds(edge))
            time.sleep(0.1)
    finally:
        stop.set()
        attacker.join(30)
    assert streamed[0] > 1024 * 1024  # the attack ran
    assert max(latencies) < 1, latencies


def test_a_stalled_request_body_is_cut_and_its_partial_upload_removed(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--no-worker", *EDGE_ARGS, "--body-timeout", "1")
    with connect(srv) as s:
        s.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n"
            b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n' + b"x" * 5000
        )
        _, closed = read_until_closed(s, 8)  # then nothing more: a slow-body client
    assert closed is not None and 0.8 < closed < 5, closed
    blobs = srv.data_dir / "blobs"
    left: list[Path] = []
    for _ in range(
        50
    ):  # the app sees the disconnect and removes the partial upload, a moment after the close
        left = [p for p in blobs.rglob("*") if p.is_file()] if blobs.exists() else []
        if not left:
            break
        time.sleep(0.1)
    assert left == []
    with connect(srv) as ok:  # and the server goes on serving
        ok.sendall(HEAD + b"Connection: close\r\n\r\n")
        got, _ = read_until_closed(ok, 5)
    assert got.startswith(b"HTTP/1.1 200 ")
