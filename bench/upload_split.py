"""Where the time of `POST /v1/files` goes: the P1 input file (50,000 lines, ~200 MB) uploaded with the official SDK
to batchyard (`serve`, wall time and the API process's CPU), next to each piece measured alone in this process: the
SDK sending the same upload to a server that discards it, the multipart parse, sha256, and the write into the page
cache (a new file, as each upload is, and the same file written again).

    python bench/upload_split.py [--lines 50000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from common import BatchyardServer, cpu_seconds, make_input, workdir
from openai import OpenAI

from batchyard.api.multipart import parse_upload

_FILE = {"id": "file-1", "object": "file", "bytes": 1, "created_at": 1, "filename": "x", "purpose": "batch"}
RESP = json.dumps({**_FILE, "status": "processed"}).encode()


class _Discard(asyncio.Protocol):
    """Reads a request body and throws it away, then answers a file object."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]
        self.head = b""
        self.left: int | None = None

    def data_received(self, data: bytes) -> None:
        if self.left is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, rest = self.head.partition(b"\r\n\r\n")
            length = next(
                v
                for k, _, v in (x.partition(b":") for x in head.split(b"\r\n"))
                if k.lower() == b"content-length"
            )
            self.left, self.head = int(length) - len(rest), b""
        else:
            self.left -= len(data)
        if self.left <= 0:
            self.t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(RESP), RESP)
            )
            self.left = None


def _discarding_server() -> int:
    ready, port = threading.Event(), [0]

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(_Discard, "127.0.0.1", 0)
        port[0] = srv.sockets[0].getsockname()[1]
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    ready.wait()
    return port[0]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def upload(base_url: str, inp: Path) -> float:
    client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    with open(inp, "rb") as fh:
        client.files.create(file=("input.jsonl", fh), purpose="batch")
    return time.perf_counter() - t0


async def _parse(body: bytes, content_type: str) -> float:
    class Sink:
        async def write(self, data: bytes) -> None:
            pass

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 65536):  # as uvicorn hands a body over
            yield body[i : i + 65536]

    async def sink() -> Sink:
        return Sink()

    c0 = _cpu()
    await parse_upload(content_type, chunks(), sink, max_file_bytes=1 << 40)
    return _cpu() - c0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    wd = workdir()
    inp = wd / "input.jsonl"
    size = make_input(inp, a.lines)
    mb = size / 1e6
    print(f"input: {a.lines} lines, {mb:.1f} MB")
    with BatchyardServer(wd, "--upstream", "http://127.0.0.1:9/v1") as srv:
        assert srv.proc is not None
        for _ in range(a.repeat):
            api0 = cpu_seconds(srv.proc.pid)
            wall = upload(srv.base_url, inp)
            print(
                f"batchyard POST /v1/files : {wall:.2f} s wall, API process CPU {cpu_seconds(srv.proc.pid) - api0:.2f} s"
            )
    port = _discarding_server()
    for _ in range(a.repeat):
        c0 = _cpu()
        wall = upload(f"http://127.0.0.1:{port}/v1", inp)
        print(
            f"SDK to a discarding server: {wall:.2f} s wall, CPU {_cpu() - c0:.2f} s (client and server threads)"
        )
    data = inp.read_bytes()
    req = httpx.Request("POST", "http://x/", files={"file": ("input.jsonl", data)}, data={"purpose": "batch"})
    body = req.read()
    print(
        f"multipart parse (64 KiB chunks): CPU {asyncio.run(_parse(body, req.headers['content-type'])):.2f} s"
    )
    chunks = [data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)]
    c0, h = _cpu(), hashlib.sha256()
    for c in chunks:
        h.update(c)
    print(f"sha256: CPU {_cpu() - c0:.2f} s")
    target = wd / "page-cache-test"
    for what in ("a new file", "the same file again"):
        c0, t0 = _cpu(), time.perf_counter()
        with open(target, "wb") as fh:
            for c in chunks:
                fh.write(c)
        print(f"write {mb:.0f} MB, {what}: {time.perf_counter() - t0:.2f} s wall, CPU {_cpu() - c0:.2f} s")
        if what == "a new file":
            os.remove(target)  # the next file gets the pages back
    os.remove(target)


if __name__ == "__main__":
    main()
