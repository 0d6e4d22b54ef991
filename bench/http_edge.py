"""The HTTP edge under abuse: memory growth and fresh-connection /health latency during each attack.

    python bench/http_edge.py [--server-arg=--head-timeout=2 ...] [--upload-mb 100]

Starts `batchyard serve --no-worker` (the API process only) and, one after the other:
- big-header: one connection streams a single header of --big-mib MiB (until the server closes it);
- many-headers: one request with 10,000 headers;
- slowloris: half a request head, then silence (how long until the server closes it);
- idle: one request on a keep-alive connection, then silence (how long until closed);
- flood: --flood idle connections held open while /health is probed;
- upload: one --upload-mb MB file through POST /v1/files (the large-body path).
Prints, for each, the API process's RSS growth, the attack's outcome and /health p50/p99/max from fresh
connections (probed every 20 ms on another thread).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BatchyardServer, _status_kib, workdir

CAP = 30.0  # seconds an attack waits for the server to close


def health_once(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        return float("inf")
    return time.perf_counter() - started


@contextlib.contextmanager
def probing(port: int, pid: int, peak: list[int]) -> Iterator[list[float]]:
    samples: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib(pid, "VmRSS:"))
            try:
                samples.append(health_once(port))
            except OSError:
                samples.append(float("inf"))
            stop.wait(0.02)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield samples
    finally:
        stop.set()
        t.join()


def closed_after(s: socket.socket, cap: float = CAP) -> tuple[float, bytes]:
    """Seconds until the peer closes `s` (cap if it never does) and what it sent before."""
    started = time.monotonic()
    s.settimeout(0.5)
    got = b""
    while time.monotonic() - started < cap:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        got += chunk
    return time.monotonic() - started, got


def big_header(port: int, mib: int) -> str:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
    chunk = b"a" * 65536
    sent = 0
    started = time.monotonic()
    try:
        while sent < mib * 1024 * 1024 and time.monotonic() - started < 60:
            s.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    _, got = closed_after(s, 5)
    s.close()
    return f"sent {sent / 2**20:.1f} MiB, answer {got[:12]!r}"


def many_headers(port: int, n: int = 10_000) -> str:
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = (
            b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n)) + b"\r\n"
        )
        with contextlib.suppress(OSError):
            s.sendall(head)
        _, got = closed_after(s, 5)
    return f"{n} headers, answer {got[:12]!r}"


def slowloris(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        took, got = closed_after(s)
    return f"half a head: closed after {took:.1f} s (cap {CAP:.0f}), answer {got[:12]!r}"


def idle(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        s.recv(65536)
        took, _ = closed_after(s)
    return f"idle keep-alive: closed after {took:.1f} s (cap {CAP:.0f})"


def flood(port: int, n: int) -> str:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                break
        time.sleep(3)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return f"{len(socks)} connections opened, {alive} still open after 3 s"
    finally:
        for s in socks:
            s.close()


def upload(port: int, mb: int) -> str:
    path = Path(workdir()) / "upload.bin"
    with open(path, "wb") as fh:
        block = os.urandom(1024 * 1024)
        for _ in range(mb):
            fh.write(block)
    started = time.perf_counter()
    with open(path, "rb") as fh:
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/files",
            files={"file": ("big.bin", fh, "application/octet-stream")},
            data={"purpose": "user_data"},
            headers={"Authorization": "Bearer sk-bench"},
            timeout=300,
        )
    took = time.perf_counter() - started
    path.unlink()
    return f"{mb} MB upload: HTTP {r.status_code} in {took:.2f} s ({mb / took:.0f} MB/s)"


def report(name: str, pid: int, port: int, attack: Callable[[], str]) -> None:
    before = _status_kib(pid, "VmRSS:")
    peak = [before]
    with probing(port, pid, peak) as samples:
        time.sleep(0.3)
        outcome = attack()
        time.sleep(0.3)
    after = _status_kib(pid, "VmRSS:")
    lat = sorted(samples) or [float("inf")]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(
        f"{name:13} RSS {before / 1024:6.1f} MiB, peak +{(peak[0] - before) / 1024:.1f}, "
        f"after +{(after - before) / 1024:.1f}; "
        f"/health p50 {statistics.median(lat) * 1000:.1f} ms p99 {p99 * 1000:.1f} ms max {lat[-1] * 1000:.1f} ms "
        f"(n={len(lat)}); {outcome}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--server-arg", action="append", default=[])
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--flood", type=int, default=2000)
    ap.add_argument("--upload-mb", type=int, default=100)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    attacks: dict[str, Callable[[int], str]] = {
        "big-header": lambda p: big_header(p, args.big_mib),
        "many-headers": many_headers,
        "slowloris": slowloris,
        "idle": idle,
        "flood": lambda p: flood(p, args.flood),
        "upload": lambda p: upload(p, args.upload_mb),
    }
    chosen = args.only.split(",") if args.only else list(attacks)
    work = workdir()
    srv_args = [
        "--no-worker",
        "--upstream",
        "http://127.0.0.1:9/v1",
        "--api-key",
        "sk-bench",
        *args.server_arg,
    ]
    with BatchyardServer(work, *srv_args) as srv:
        assert srv.proc is not None
        for name in chosen:
            report(name, srv.proc.pid, srv.port, lambda n=name: attacks[n](srv.port))


if __name__ == "__main__":
    main()
