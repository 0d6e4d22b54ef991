"""Throughput of the streaming multipart parser behind ``POST /v1/files`` (api/multipart.py).

Encodes one upload of --mb MiB (random bytes, with a `purpose` field) with httpx, feeds it to `parse_upload` in
--chunk-byte chunks (as uvicorn hands a request body over) into a sink that only counts, and prints the best MB/s of
--repeat runs (1 MB = 10**6 bytes). It was a unit test (test_throughput_50mb_64k_chunks) until issue 10.

    .venv/bin/python bench/multipart_parse.py [--mb 50] [--chunk 65536] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import AsyncIterator

import httpx

from batchyard.api.multipart import FileSink, parse_upload


class CountingSink:
    def __init__(self) -> None:
        self.n = 0

    async def write(self, data: bytes) -> None:
        self.n += len(data)


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def parse_once(content_type: str, body: bytes, chunk: int, size: int) -> float:
    sink = CountingSink()

    async def open_sink() -> FileSink:
        return sink

    t0 = time.perf_counter()
    form = await parse_upload(content_type, chunks(body, chunk), open_sink, max_file_bytes=size)
    dt = time.perf_counter() - t0
    assert form.file_bytes == sink.n == size, (form.file_bytes, sink.n, size)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=50, help="file size in MiB (default 50)")
    ap.add_argument("--chunk", type=int, default=64 * 1024, help="body chunk size in bytes (default 65536)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    size = args.mb * 1024 * 1024
    content = os.urandom(1024 * 1024) * args.mb
    req = httpx.Request(
        "POST", "http://bench/v1/files", files={"file": ("big.jsonl", content)}, data={"purpose": "batch"}
    )
    content_type, body = req.headers["content-type"], req.read()
    best = min(asyncio.run(parse_once(content_type, body, args.chunk, size)) for _ in range(args.repeat))
    print(
        f"multipart parse throughput: {size / best / 1e6:.0f} MB/s "
        f"({size / 1e6:.1f} MB in {best:.3f} s, {args.chunk}-byte chunks, best of {args.repeat})"
    )


if __name__ == "__main__":
    main()
