"""The worker's CPU per line, without the API: one batch run by a `Worker` in this process (SQLite store, local
blobs, the router `--upstream` builds, metrics in multiprocess mode as under `serve`) against nginx answering a
fixed completion, next to a raw asyncio + httptools client (64 connections, no retries, no limits, no store) that
reads the same file, sends the same bodies and writes the same kind of output line. Each side runs in a fresh
interpreter; CPU is the process's (all threads), counted from the batch's creation to its `completed`
(validation, execution and finalization, as `bench/p1_throughput.py` counts the worker), or from the first line
read to the last one written for the raw client.

    python bench/dispatch_cpu.py [--lines 50000] [--line-bytes 4000] [--concurrency auto] [--runs 1]
    python bench/dispatch_cpu.py --side batchyard   # one side alone (e.g. under `py-spy record -- ...`)
    python bench/dispatch_cpu.py --zero             # the worker alone: an in-process upstream, no sockets

Needs Debian's nginx (`apt-get install -y nginx-light`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import COMPLETION, Nginx, make_input, workdir

OWNER = "bench"


def _zero_router() -> Any:
    """A router to an in-process upstream that answers every request at once (after one trip through the event
    loop), with a fixed limit of 64: the worker's own cost, without sockets or nginx."""
    from batchyard.upstreams.base import Upstream, UpstreamResponse
    from batchyard.upstreams.limiter import Limiter
    from batchyard.upstreams.router import Router

    answer = json.dumps(COMPLETION).encode()

    class Zero(Upstream):
        name = "zero"

        async def call(self, endpoint: str, body: bytes, *, timeout: float) -> UpstreamResponse:
            await asyncio.sleep(0)
            return UpstreamResponse(200, {}, answer, None)

    return Router([(None, Zero())], limiter=lambda: Limiter(64))


async def run_batchyard(inp: Path, base_url: str, concurrency: str, data: Path) -> dict[str, float]:
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="by-metrics-"))
    from batchyard.blobs.factory import open_blobs
    from batchyard.config import Settings
    from batchyard.domain.models import BatchRecord, FileRecord
    from batchyard.domain.states import BatchStatus
    from batchyard.execution.worker import Worker
    from batchyard.store.factory import open_store
    from batchyard.upstreams.factory import build_router

    settings = Settings(
        data_dir=data,
        upstreams=[(None, base_url)],
        concurrency=None if concurrency == "auto" else int(concurrency),
        embedded=False,
    )
    router = build_router(settings) if base_url != "zero" else _zero_router()
    store, blobs = open_store(settings), open_blobs(settings)
    await store.open()
    await router.start()
    w = await blobs.open_writer("files/file-in")
    with open(inp, "rb") as fh:
        while chunk := fh.read(1 << 20):
            await w.write(chunk)
    info = await w.commit()
    now = int(time.time())
    await store.insert_file(
        FileRecord("file-in", OWNER, info.size, now, "in.jsonl", "batch", info.key, info.sha256)
    )
    worker = Worker(store, blobs, router, settings)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)  # the loops are idle, waiting for work
    phases: dict[str, float] = {}
    cpu0, t0, ru0 = time.process_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    await store.insert_batch(
        BatchRecord(
            "batch_bench",
            OWNER,
            "/v1/chat/completions",
            "file-in",
            "24h",
            BatchStatus.VALIDATING,
            now,
            now + 86400,
        )
    )
    worker.wake(nudge=False)
    while True:
        b = await store.get_batch(None, "batch_bench")
        assert b is not None
        phases.setdefault(b.status.value, time.perf_counter() - t0)
        if b.status.value in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.01)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sys_cpu, faults = ru.ru_stime - ru0.ru_stime, ru.ru_minflt - ru0.ru_minflt
    assert b.status == BatchStatus.COMPLETED, b
    assert b.completed == b.total, (b.completed, b.total)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await router.aclose()
    await store.close()
    await blobs.aclose()
    return {
        "cpu": cpu,
        "sys": sys_cpu,
        "faults": faults,
        "wall": wall,
        **{f"at_{k}": v for k, v in phases.items()},
    }


async def run_raw(inp: Path, base_url: str, out_path: Path, pool: int = 64) -> dict[str, float]:
    """The least a Python client does for a line: parse it, send its body, parse the answer, write a line."""
    import secrets
    from urllib.parse import urlsplit

    import httptools
    import orjson

    u = urlsplit(base_url)
    head = (
        f"POST {u.path}/chat/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
    ).encode()
    loop = asyncio.get_running_loop()

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.chunks: list[bytes] = []
            self.waiter: asyncio.Future[bytes] | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.chunks.append(body)

        def on_message_complete(self) -> None:
            body, self.chunks = b"".join(self.chunks), []
            assert self.waiter is not None
            self.waiter.set_result(body)

        async def post(self, payload: bytes) -> bytes:
            self.waiter = loop.create_future()
            self.transport.writelines((head, b"Content-Length: %d\r\n\r\n" % len(payload), payload))
            return await self.waiter

    cpu0, t0, ru0 = time.process_time(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    with open(inp, "rb") as src, open(out_path, "wb") as out:
        lines = iter(src)

        async def lane() -> None:
            _, conn = await loop.create_connection(Conn, u.hostname, u.port)
            for raw in lines:
                req = orjson.loads(raw)
                body = orjson.loads(await conn.post(orjson.dumps(req["body"])))
                out.write(
                    orjson.dumps(
                        {
                            "id": f"batch_req_{secrets.token_hex(12)}",
                            "custom_id": req["custom_id"],
                            "response": {"status_code": 200, "request_id": "", "body": body},
                            "error": None,
                        }
                    )
                    + b"\n"
                )
            conn.transport.close()

        await asyncio.gather(*(lane() for _ in range(pool)))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    sys_cpu, faults = ru.ru_stime - ru0.ru_stime, ru.ru_minflt - ru0.ru_minflt
    return {
        "cpu": time.process_time() - cpu0,
        "sys": sys_cpu,
        "faults": faults,
        "wall": time.perf_counter() - t0,
    }


def side(name: str, inp: Path, base_url: str, concurrency: str, wd: Path) -> dict[str, float]:
    """One side in a fresh interpreter (uvloop, as the worker uses)."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            name,
            "--input",
            str(inp),
            "--base-url",
            base_url,
            "--concurrency",
            concurrency,
            "--workdir",
            str(wd),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--line-bytes", type=int, default=4000)
    ap.add_argument("--concurrency", default="auto")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--side", choices=("batchyard", "raw"))
    ap.add_argument("--input", type=Path)
    ap.add_argument("--base-url")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument(
        "--zero", action="store_true", help="batchyard side only, against an in-process upstream (no sockets)"
    )
    a = ap.parse_args()
    if a.side is not None and a.input is not None:  # a child of main(), or a direct call with an input
        import uvloop

        wd = a.workdir or workdir()
        if a.side == "batchyard":
            res = uvloop.run(
                run_batchyard(a.input, a.base_url, a.concurrency, Path(tempfile.mkdtemp(dir=wd)))
            )
        else:
            res = uvloop.run(run_raw(a.input, a.base_url, wd / "raw-out.jsonl"))
        print(json.dumps(res))
        return
    wd = workdir()
    inp = wd / "input.jsonl"
    size = make_input(inp, a.lines, a.line_bytes)
    print(f"input: {a.lines} lines, {size / 1e6:.1f} MB")
    per_line = 1e6 / a.lines
    with Nginx(wd) as ng:
        sides = [a.side] if a.side else ["raw", "batchyard"]
        for _ in range(a.runs):
            url = "zero" if a.zero else ng.base_url
            got = {
                name: side(name, inp, url, a.concurrency, wd) for name in (["batchyard"] if a.zero else sides)
            }
            for name, r in got.items():
                extra = ", ".join(f"{k[3:]} {v:.2f}" for k, v in r.items() if k.startswith("at_"))
                print(
                    f"{name:9s}: {r['cpu'] * per_line:5.1f} us CPU a line ({r['sys'] * per_line:4.1f} system, {r['faults'] / a.lines:.1f} page faults), {a.lines / r['wall']:7.0f} lines/s "
                    f"({r['wall']:.2f} s{'; s since create: ' + extra if extra else ''})"
                )
            if len(got) == 2:
                print(f"CPU ratio batchyard/raw: {got['batchyard']['cpu'] / got['raw']['cpu']:.2f}")


if __name__ == "__main__":
    main()
